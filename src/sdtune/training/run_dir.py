"""Run folders (who may write them) and Ctrl-C handling."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from sdtune import records
from sdtune.preflight import RunExistsError
from sdtune.training.checkpoint import checkpoint_dirs, resolve_resume

# What a start that failed before its first checkpoint leaves behind (TensorBoard's event files,
# compare's copy of the error, the live report's progress.json): nothing a new start would lose
LEFTOVERS = ("logs", "error.log", records.PROGRESS_FILE)


def claim_run_dir(run_dir: Path, resume: str | bool | None, overwrite: bool) -> bool:
    """Refuse to clobber a finished or resumable run; clear what may be cleared; create the folder.
    Return whether the folder is new (nothing in it is the user's: :func:`release_run_dir` may remove
    it). With ``overwrite`` the old run is moved aside (:func:`set_aside`), not deleted.

    ``--resume`` with nothing to resume says so: an empty (or missing) folder, or one holding only
    the leftovers of a failed start, trains from step 0; a folder with anything else and no
    checkpoint is refused. Nothing is deleted without ``overwrite``."""
    record = records.read_record(run_dir)
    new = not run_dir.exists() or not any(run_dir.iterdir())
    if overwrite and not new:
        set_aside(run_dir)
        record, new = None, True
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
    return new


def replaced_path(run_dir: Path) -> Path:
    """Where ``--overwrite`` keeps the run it replaces until the new one has finished."""
    return run_dir.with_name(f".{run_dir.name}.replaced")


def set_aside(run_dir: Path) -> None:
    """Move the run that ``--overwrite`` replaces beside it (:func:`replaced_path`). One already there
    is the last finished run of an earlier replacement that did not finish; it stays, and the
    unfinished replacement is what goes."""
    aside = replaced_path(run_dir)
    if aside.exists():
        if (records.read_record(run_dir) or {}).get("status") != "finished":
            shutil.rmtree(run_dir)
            return
        shutil.rmtree(aside)
    os.replace(run_dir, aside)


def release_run_dir(run_dir: Path, new: bool) -> None:
    """After a run that did not finish: a new folder without a checkpoint goes (so that the same
    command can run again), and the run an ``--overwrite`` set aside comes back — unless the new run
    has a checkpoint to resume from, when both stay and the message says where the old one is."""
    aside = replaced_path(run_dir)
    if checkpoint_dirs(run_dir):
        if aside.exists():
            print(f"the finished run that --overwrite replaces is kept in {aside} until this one finishes "
                  "(--resume); it is removed then")
        return
    if new and run_dir.exists():
        shutil.rmtree(run_dir)
    if aside.exists():
        os.replace(aside, run_dir)


def drop_replaced(run_dir: Path) -> None:
    """The new run finished: the run it replaced is removed."""
    aside = replaced_path(run_dir)
    if aside.exists():
        shutil.rmtree(aside)


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
