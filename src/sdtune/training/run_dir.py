"""Run folders: who may write them, Ctrl-C handling, and what a record says about the trained modules."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdtune import records
from sdtune.errors import UserError
from sdtune.techniques import count_parameters
from sdtune.training.checkpoint import resolve_resume
from sdtune.util import allocator

if TYPE_CHECKING:
    from sdtune.models import ModelBundle


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


def trained_modules(parameters: dict[str, torch.nn.Parameter], bundle: ModelBundle) -> list[str]:
    """Names of the modules holding trained parameters; a fully trained component is one entry."""
    result = []
    for prefix in bundle.trainable_names():
        module = bundle.components[prefix]
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


def _objective(objective: Any) -> dict[str, Any]:
    """The objective's settings as plain values (the DDPM schedule tensor is left out)."""
    values = {f.name: getattr(objective, f.name) for f in dataclasses.fields(objective) if f.name != "alphas_cumprod"}
    return {"name": objective.name, **values}


def train_record(
    ctx: Any, experiment: Any, name: str, bundle: ModelBundle, status: str, state: dict, timing: dict,
    max_steps: int, outputs: dict,
) -> dict[str, Any]:
    """The run record of a training run: everything needed to judge and reproduce it."""
    steps_run = max(state["step"], 1)
    spec = experiment.techniques[name]
    accelerator = ctx.accelerator
    return {
        "kind": "train",
        "status": status,
        "experiment": experiment.name,
        "technique": {"name": name, "kind": spec.kind, "options": spec.options},
        "model": {"source": experiment.model.path, "family": bundle.family.name, "denoiser": bundle.family.denoiser},
        "config": experiment.to_dict(),
        "train": dataclasses.asdict(ctx.config),
        "seeds": {"train": ctx.config.seed},
        "objective": _objective(ctx.objective),
        "prediction_type": ctx.objective.prediction_type,
        "steps": {"done": state["step"], "max": max_steps},
        "versions": records.package_versions(),
        "git_commit": records.git_commit(),
        "device": records.device_description(accelerator.device),
        "num_processes": accelerator.num_processes,
        "sharding": ctx.sharding,  # fsdp2 | deepspeed | None: each process holds whole weights (DDP, one process)
        "timing": {
            **timing,
            "s_per_step": timing["train_time_s"] / steps_run,
            "images_per_s": timing["images_per_step"] * steps_run / max(timing["train_time_s"], 1e-9),
        },
        "memory": {"peak": records.peak_memory(accelerator.device), "cpu_allocator": allocator.state()},
        "parameters": {
            "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in ctx.parameters.values()),  # (ZeRO-3: partitioned)
            "components": {name: count_parameters(module) for name, module in bundle.components.items()},
            "trained_modules": trained_modules(ctx.parameters, bundle),
        },
        "outputs": {  # each part's files, bytes, and the tools that read them (the technique says)
            part: {**value, "loads_in": getattr(ctx.technique, "loads_in", lambda *_: [])(part, bundle.family)}
            for part, value in outputs.items()
        },
        "bytes_on_disk": sum(part["bytes"] for part in outputs.values()),
        "data": {
            "source": experiment.data.source,
            "num_samples": len(ctx.training_set),
            "skipped_images": len(ctx.training_set.skipped),
            "skipped_examples": ctx.training_set.skipped[:10],
            "cache": None if ctx.latent_cache is None else ctx.latent_cache.mode,
            "samples_per_epoch": ctx.training_set.num_slots,  # repeats counted
            "buckets": ctx.training_set.bucket_summary(),  # [{width, height, images, samples}] or None
            "masked_images": sum(m is not None for m in ctx.training_set.masks),
            "converted_images": ctx.training_set.converted,  # {PIL mode: count} converted to RGB
        },
        "loss_history": state["loss_history"],
        "evaluation": state.get("evaluation", []),  # validation loss and images during training
        "resumed_from": state.get("resumed_from", []),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
