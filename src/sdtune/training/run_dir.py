"""Run folders (who may write them) and Ctrl-C handling."""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path
from typing import Any

from sdtune import records
from sdtune.errors import UserError
from sdtune.training.checkpoint import resolve_resume


class RunExistsError(UserError, RuntimeError):
    """The run folder holds a finished (or resumable) run; the message says how to proceed."""


def claim_run_dir(run_dir: Path, resume: str | bool | None, overwrite: bool) -> None:
    """Refuse to clobber a finished or resumable run; clear what may be cleared; create the folder."""
    record = records.read_record(run_dir)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
        record = None
    if record is not None and record.get("status") == "finished":
        raise RunExistsError(
            f"{run_dir} holds a finished run; pass --overwrite to replace it or --output to write elsewhere"
        )
    checkpoint = resolve_resume(run_dir, resume)
    if resume and checkpoint is None and run_dir.exists():
        print(f"no checkpoint in {run_dir}; starting from step 0")
        shutil.rmtree(run_dir)  # nothing finished and nothing resumable: only logs of a failed start
    if checkpoint is None and run_dir.exists() and any(run_dir.iterdir()):
        raise RunExistsError(
            f"{run_dir} is not empty (an unfinished run?); pass --resume to continue it or --overwrite to "
            "start over"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to checkpoint and stop after the current step; a second Ctrl-C
    stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (a checkpoint will be saved); Ctrl-C again to abort at once")

    def installed(self) -> contextlib.AbstractContextManager:
        return interrupt_handler(self._handle)


@contextlib.contextmanager
def interrupt_handler(handler: Any):
    """Ctrl-C (SIGINT) calls ``handler`` inside the block; outside the main thread nothing changes."""
    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
