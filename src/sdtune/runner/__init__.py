"""Running techniques: several of an experiment, each in a fresh process of its own."""

from sdtune.runner.isolate import TechniqueFailed, report_error, train_in_fresh_process
from sdtune.runner.runs import train

__all__ = ["TechniqueFailed", "report_error", "train", "train_in_fresh_process"]
