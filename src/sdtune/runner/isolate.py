"""Train one technique in a fresh Python process, so that what it measures is its own.

Peak memory (a process's peak RSS can only grow; CUDA's allocator keeps what it cached), precision
flags, allocator and library state all start clean for every technique, exactly as when a user
runs ``sdtune train --technique NAME`` by hand. The child is that very command on the experiment
as resolved here (``Experiment.to_dict``: a compare seed, the detected family and the native
resolution included); it writes its record, which the parent reads back. Ctrl-C reaches the child
(the same terminal process group), which checkpoints and stops; the parent waits for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import yaml

from sdtune import records
from sdtune.experiment import Experiment
from sdtune.training.run_dir import interrupt_handler
from sdtune.util import atomic

ERROR_FILE_VARIABLE = "SDTUNE_ERROR_FILE"  # where a child `sdtune` writes the error that ended it


class TechniqueFailed(RuntimeError):
    """A technique's training process ended with an error; ``user_error`` tells a bad input (one
    line, the user's to fix) from a bug (its traceback is in ``details``)."""

    def __init__(self, name: str, message: str, details: str | None, user_error: bool) -> None:
        super().__init__(message)
        self.name, self.details, self.user_error = name, details, user_error


def train_in_fresh_process(
    experiment: Experiment,
    name: str,
    output_root: Path,
    resume: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    environment: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``sdtune train`` for one technique in a child process; return its run record (with
    ``stop_after``, the run stops after that step: ``interrupted``, checkpointed, resumable).
    ``environment`` adds variables to the child's (e.g. its thread count, ``OMP_NUM_THREADS``)."""
    with tempfile.TemporaryDirectory(prefix="sdtune-") as folder:
        experiment_file = Path(folder) / "experiment.yaml"
        atomic.write_text(experiment_file, yaml.safe_dump(experiment.to_dict(), sort_keys=False))
        error_file = Path(folder) / "error.json"
        command = [sys.executable, "-m", "sdtune.cli", "train", str(experiment_file), "--technique", name,
                   "--output", str(output_root)]
        if resume:
            command += ["--resume"] + ([] if resume in (True, "latest") else [str(resume)])
        if overwrite:
            command.append("--overwrite")
        if not progress:
            command.append("--no-progress")
        if stop_after is not None:
            command += ["--stop-after", str(stop_after)]
        child_environment = {**os.environ, **(environment or {}), ERROR_FILE_VARIABLE: str(error_file)}
        with _interrupts_left_to_the_child():
            returncode = subprocess.call(command, env=child_environment)
        if error_file.exists():
            error = json.loads(error_file.read_text())
            raise TechniqueFailed(name, error["message"], error.get("traceback"), error["user_error"])
    record = records.read_record(output_root / name)
    if returncode not in (0, 130) or record is None:
        raise TechniqueFailed(name, f"the training process of {name!r} exited with status {returncode}", None, False)
    return record


def report_error(error: BaseException, user_error: bool) -> bool:
    """In a child started by :func:`train_in_fresh_process`: hand the error to the parent (True), so
    that it is reported once, by the parent. Outside one: False (report it as usual)."""
    path = os.environ.get(ERROR_FILE_VARIABLE)
    if not path:
        return False
    details = None if user_error else "".join(traceback.format_exception(error))
    try:
        atomic.write_json(path, {"message": str(error), "traceback": details, "user_error": user_error})
    except OSError:  # (a full disk: the error is reported here instead, on this process's stderr)
        return False
    return True


def _interrupts_left_to_the_child() -> contextlib.AbstractContextManager:
    """While the child runs, Ctrl-C is its to handle (checkpoint, stop); the parent keeps waiting.
    (A Python handler, not SIG_IGN: an ignored signal would stay ignored in the child after exec.)"""
    return interrupt_handler(lambda signum, frame: None)
