"""Fixtures for tests and benchmarks: tiny random-weight models of every family (:mod:`.tiny`) and tiny
captioned datasets and experiment files (:mod:`.data`). No library module imports this package."""

from sdtune.testing.data import COLOURS, WORDS, experiment_dict, finished_train_record, make_imagefolder

__all__ = ["COLOURS", "WORDS", "experiment_dict", "finished_train_record", "make_imagefolder"]
