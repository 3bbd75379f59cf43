"""The run record of a training run: everything needed to judge and reproduce it (see :mod:`sdtune.records`)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

import torch

from sdtune import records
from sdtune.models import Model
from sdtune.techniques import count_parameters
from sdtune.training.setup import TrainingRun
from sdtune.training.state import TrainState
from sdtune.util import allocator


def trained_modules(parameters: dict[str, torch.nn.Parameter], model: Model) -> list[str]:
    """Names of the modules holding trained parameters; a fully trained component is one entry."""
    result = []
    for prefix in model.trainable_names():
        module = model.components[prefix]
        names = [n for n in parameters if n.startswith(prefix + ".")]
        if not names:
            continue
        if len(names) == sum(1 for _ in module.parameters()):
            result.append(f"{prefix} (all)")
            continue
        result += sorted({n.rsplit(".", 1)[0] for n in names})
    return result


def objective_settings(objective: Any) -> dict[str, Any]:
    """The objective's settings as plain values (the DDPM schedule tensor is left out)."""
    values = {f.name: getattr(objective, f.name) for f in dataclasses.fields(objective) if f.name != "alphas_cumprod"}
    return {"name": objective.name, **values}


def savers_used(run: TrainingRun) -> dict[str, Any]:
    """The memory savers the run used (docs/memory.md), with what block swap and parked encoders did."""
    config, swap = run.config, run.block_swap
    return {
        "optimizer": config.optimizer,
        "optimizer_offload": config.optimizer_offload,
        "fused_backward": config.fused_backward,
        "gradient_checkpointing": config.gradient_checkpointing,
        "parked_encoders": list(run.inputs.parked),  # train.free_encoders: the components that left the device
        "block_swap": None if swap is None else {
            "blocks": len(swap.frozen), "swapped_bytes": swap.swapped_bytes, "arrivals": swap.arrivals,
            "most_in_at_once": swap.most_in,
        },
    }


def train_record(
    run: TrainingRun, model: Model, status: str, state: TrainState, timing: dict[str, Any], outputs: dict[str, Any],
    checks: dict[str, Any] | None = None, anatomy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of ``run`` after its loop: ``model`` is the trained model as saved, ``outputs`` each
    saved part's files and bytes, ``checks``/``anatomy`` the trained-what-it-claims check and the
    anatomy of the weight change (finished runs)."""
    steps_run = max(state.step, 1)
    experiment, accelerator, item = run.experiment, run.accelerator, run.experiment.techniques[run.name]
    training_set, cache = run.training_set, run.inputs.cache
    return {
        "kind": "train",
        "status": status,
        "experiment": experiment.name,
        "technique": {"name": run.name, "kind": item.kind, "options": item.options_dict()},
        "model": {"source": experiment.model.path, "family": model.family, "denoiser": model.denoiser_name},
        "config": experiment.to_dict(),
        "train": dataclasses.asdict(run.config),
        "seeds": {"train": run.config.seed},
        "objective": objective_settings(run.objective),
        "prediction_type": run.objective.prediction_type,
        "steps": {"done": state.step, "max": run.max_steps},
        "versions": records.package_versions(),
        "git_commit": records.git_commit(),
        "device": records.device_description(accelerator.device),
        "num_processes": accelerator.num_processes,
        "sharding": run.sharding,  # fsdp2 | deepspeed | None: each process holds whole weights (DDP, one process)
        "timing": {
            **timing,
            "s_per_step": timing["train_time_s"] / steps_run,
            "images_per_s": timing["images_per_step"] * steps_run / max(timing["train_time_s"], 1e-9),
        },
        "memory": {
            "peak": records.peak_memory(accelerator.device), "cpu_allocator": allocator.state(), "savers": savers_used(run),
        },
        "parameters": {
            "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in run.parameters.values()),  # (ZeRO-3: partitioned)
            "components": {name: count_parameters(module) for name, module in model.components.items()},
            "trained_modules": trained_modules(run.parameters, model),
        },
        "outputs": {  # each part's files, bytes, and the tools that read them (the technique says)
            part: {**value, "loads_in": getattr(run.technique, "loads_in", lambda *_: [])(part, model.family)}
            for part, value in outputs.items()
        },
        "bytes_on_disk": sum(part["bytes"] for part in outputs.values()),
        "data": {
            "source": experiment.data.source,
            "num_samples": len(training_set),
            "skipped_images": len(training_set.skipped),
            "skipped_examples": training_set.skipped[:10],
            "cache": None if cache is None else cache.mode,
            "samples_per_epoch": training_set.num_slots,  # repeats counted
            "buckets": training_set.bucket_summary(),  # [{width, height, images, samples}] or None
            "masked_images": sum(m is not None for m in training_set.masks),
            "converted_images": training_set.converted,  # {PIL mode: count} converted to RGB
        },
        "loss_history": state.loss_history,
        "evaluation": state.evaluation,  # validation loss and images during training
        "resumed_from": state.resumed_from,
        "checks": checks or {},
        "anatomy": anatomy,
        "changed_on_resume": state.changed_on_resume,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
