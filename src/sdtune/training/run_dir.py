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


# What a start that failed before its first checkpoint leaves behind (TensorBoard's event files,
# compare's copy of the error): nothing a new start of the run would lose
LEFTOVERS = ("logs", "error.log")


def claim_run_dir(run_dir: Path, resume: str | bool | None, overwrite: bool) -> None:
    """Refuse to clobber a finished or resumable run; clear what may be cleared; create the folder.

    ``--resume`` with nothing to resume says so: an empty (or missing) folder, or one holding only
    the leftovers of a failed start, trains from step 0; a folder with anything else and no
    checkpoint is refused. Nothing is deleted without ``overwrite``."""
    record = records.read_record(run_dir)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
        record = None
    if record is not None and record.get("status") == "finished":
        raise RunExistsError(
            f"{run_dir} holds a finished run; pass --overwrite to replace it or --output to write elsewhere"
        )
    checkpoint = resolve_resume(run_dir, resume)
    kept = unfinished_work(run_dir)
    if resume and checkpoint is None:
        if kept:
            raise RunExistsError(
                f"nothing to resume in {run_dir}: it has no checkpoint but holds {', '.join(kept[:3])}; pass "
                "--overwrite to start over (this removes them) or --output DIR to train elsewhere"
            )
        print(f"nothing to resume in {run_dir} (no checkpoint yet): training from step 0")
    elif checkpoint is None and kept:
        raise RunExistsError(
            f"{run_dir} is not empty (an unfinished run?); pass --resume to continue it or --overwrite to "
            "start over"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def unfinished_work(run_dir: Path) -> list[str]:
    """The entries of a run folder that a start from step 0 would overwrite (leftovers of a failed
    start and the temporary files of an interrupted write are not work)."""
    if not run_dir.is_dir():
        return []
    return sorted(
        entry.name for entry in run_dir.iterdir()
        if entry.name not in LEFTOVERS and not entry.name.startswith(".") and not _empty_folder(entry)
    )


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


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
