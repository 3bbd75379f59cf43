"""Training several techniques of an experiment, each in its own process (see :mod:`.isolate`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdtune import records
from sdtune.experiment import Experiment
from sdtune.preflight import check_training
from sdtune.runner.isolate import train_in_fresh_process
from sdtune.training import CheckpointError, TrainResult, output_root, train_technique
from sdtune.util.distributed import launched_processes


def train(
    experiment: Experiment,
    techniques: list[str] | None = None,
    output_dir: str | Path | None = None,
    resume: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    isolate: bool | None = None,
    on_result: Callable[[TrainResult], None] | None = None,
    stop_after: int | None = None,
) -> list[TrainResult]:
    """Train the named techniques (default: all of the experiment) one after the other.

    With several techniques each trains in a fresh process (``isolate``, see :mod:`sdtune.runner.isolate`),
    so its time, memory and flags are its own; a single one trains in this process, and so do all
    under a launcher (torchrun / accelerate launch: the launched processes are the ones that train;
    ``sdtune compare --plan`` gives one command per technique to launch separately). With
    ``resume``, techniques that already finished are skipped; a checkpoint path needs exactly one
    technique. The returned results do not keep the models (see :func:`sdtune.training.train_technique`);
    ``on_result`` sees each one as soon as its technique ends. ``stop_after`` stops each run after
    that optimizer step, checkpointed (``--resume`` continues it). Every technique is checked before
    the first one trains (:func:`sdtune.preflight.check_training`).
    """
    names = check_training(experiment, techniques, output_dir, resume, overwrite)  # before any technique trains
    if resume not in (None, False, True, "latest") and len(names) != 1:
        raise CheckpointError("--resume PATH names one run's checkpoint: add --technique NAME")
    results = []
    for name in names:
        run_dir = output_root(experiment, output_dir) / name
        finished = (records.read_record(run_dir) or {}).get("status") == "finished"
        if resume and finished and not overwrite:
            print(f"{name}: already finished in {run_dir}; skipped")
            continue
        if isolate if isolate is not None else len(names) > 1 and launched_processes() == 1:
            record = train_in_fresh_process(
                experiment, name, output_root(experiment, output_dir), resume, overwrite, progress, stop_after
            )
            result = TrainResult(run_dir=run_dir, status=record["status"], record=record)
        else:
            result = train_technique(experiment, name, output_dir, resume, overwrite, progress, stop_after=stop_after)
            result.model = None  # the caller gets records, not models
        results.append(result)
        if on_result is not None:
            on_result(result)
        if result.status != "finished":
            break
    return results
