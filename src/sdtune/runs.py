"""Run folders: who may write them, Ctrl-C handling, and what a record says about the trained modules."""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdtune import records
from sdtune.checkpoint import resolve_resume

if TYPE_CHECKING:
    from sdtune.models import ModelBundle


class RunExistsError(RuntimeError):
    """The run folder holds a finished (or resumable) run; the message says how to proceed."""


def claim_run_dir(run_dir: Path, resume: str | bool | None, overwrite: bool) -> Path | None:
    """Refuse to clobber a finished or resumable run; return the checkpoint to resume from."""
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
    return checkpoint


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

    @contextlib.contextmanager
    def installed(self):
        try:
            previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def trained_modules(parameters: dict[str, torch.nn.Parameter], bundle: ModelBundle) -> list[str]:
    """Names of the modules holding trained parameters; a fully trained component is one entry."""
    result = []
    for prefix, module in (("unet", bundle.unet), ("text_encoder", bundle.text_encoder)):
        names = [n for n in parameters if n.startswith(prefix + ".")]
        if not names:
            continue
        if len(names) == sum(1 for _ in module.parameters()):
            result.append(f"{prefix} (all)")
            continue
        result += sorted({n.rsplit(".", 1)[0] for n in names})
    return result


def flat_scalars(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
