"""After the loop: the run's timing, its saved outputs (EMA weights when used), the anatomy of its
weight change and the trained-what-it-claims check, and its record."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sdtune import records
from sdtune.anatomy import base_lookup, model_anatomy
from sdtune.models import Model
from sdtune.techniques import trainable_named_parameters
from sdtune.training import sharding
from sdtune.training.checkpoint import checkpoint_path, restore_parameters
from sdtune.training.record import train_record
from sdtune.training.setup import TrainingRun, trains
from sdtune.training.state import TrainState
from sdtune.training.trained_check import GradientWitness, check_trained
from sdtune.util import atomic
from sdtune.util.timing import StepClock


def run_timing(run: TrainingRun, clock: StepClock, state: TrainState, first_step: int, setup_time_s: float) -> dict[str, Any]:
    """Setup (model load, data, cache), loop time (device-synchronised, checkpoint writes excluded),
    first-use encodes, and the steady-state rate once every sample the run uses is cached."""
    steps = max(state.step - first_step, 1)
    cache = run.inputs.cache
    steady = clock.steady_s_per_step()
    return {
        **run.timing,
        "setup_time_s": setup_time_s,
        "train_time_s": state.train_time_s,  # every session of the run (resumed ones added up)
        "session_train_time_s": clock.total_s,
        "checkpoint_time_s": clock.excluded_by.get("checkpoint", 0.0),
        "evaluation_time_s": clock.excluded_by.get("evaluation", 0.0),  # validation loss, images (this session)
        "encode_time_s": run.inputs.encode_time_s if cache is not None else 0.0,  # first-use encodes in the loop
        "encoded_images": cache.encoded_images if cache is not None else None,
        "images_per_step": run.images_per_step,
        "s_per_step_session": clock.total_s / steps,
        "steady_s_per_step": steady,
        "steady_images_per_s": run.images_per_step / steady if steady else None,
        "host_syncs": clock.syncs,
    }


def finish_run(
    run: TrainingRun, status: str, state: TrainState, timing: dict[str, Any], started: float, witness: GradientWitness
) -> tuple[dict[str, Any], Model]:
    """Save the technique's outputs (EMA weights when used), take the anatomy of the change and check
    that the technique trained what it claims, and write the run record; return the record and the
    trained model (EMA weights if used).

    A finished run's final state is checkpointed before this is called (:mod:`sdtune.training.loop`);
    the outputs are written into a private folder and moved into the run folder once all of them
    are complete, then the record; only then is the final state's checkpoint removed. A write that
    fails leaves that checkpoint, and ``--resume`` writes the outputs from it (docs/resume.md)."""
    accelerator = run.accelerator
    saving_started = time.perf_counter()
    finished = status == "finished"
    gradients = witness.merged(accelerator) if finished else None  # (every process takes part)
    ema = _ema_differs(run) if finished and run.ema is not None else None
    if finished and run.ema is not None:
        run.ema.copy_to(sharding.ema_tensors(accelerator, run.parameters))  # the study saves the EMA weights
    model = _gathered_model(run) if run.sharding and finished else run.unwrapped_model()
    final_state = checkpoint_path(run.run_dir, state.step) if finished else None
    outputs: dict[str, Any] = {}
    anatomy, checks = None, {}
    with _resumable_from(final_state):
        if finished and accelerator.is_main_process:
            for component in model.trainable_names():
                model.components[component].eval()
            if run.objective.name == "ddpm":  # a prediction_type override must reach the sampler too
                model.inference_scheduler.register_to_config(prediction_type=run.objective.prediction_type)
            with atomic.filling(run.run_dir) as staging:  # all of the outputs, or none of them
                saved = run.technique.save(_with_original_frozen_parts(run, model), staging)
            outputs = {part: {"files": files, "bytes": records.bytes_on_disk(run.run_dir, files)} for part, files in saved.items()}
            timing["save_time_s"] = time.perf_counter() - saving_started
            anatomy, checks = _anatomy_and_check(run, model, state, gradients, ema)
        timing.setdefault("save_time_s", time.perf_counter() - saving_started)
        timing["job_wall_time_s"] = time.perf_counter() - started  # from the call to the record
        record = train_record(run, model, status, state, timing, outputs, checks, asdict(anatomy) if anatomy else None)
        if accelerator.is_main_process:
            records.write_record(run.run_dir / records.RECORD_FILE, record)
    if final_state is not None and accelerator.is_main_process:
        atomic.remove(final_state)  # the outputs and the record hold it now
    accelerator.wait_for_everyone()  # no process leaves before the run's files are written
    return record, model


@contextlib.contextmanager
def _resumable_from(checkpoint: Path | None) -> Iterator[None]:
    """A failed write of the outputs or the record says how to finish the run from its final state."""
    try:
        yield
    except atomic.WriteError as error:
        if checkpoint is None or not checkpoint.is_dir():
            raise
        raise atomic.WriteError(
            error.path, error.code, f"the trained state is safe in {checkpoint}: fix that, then rerun with --resume "
            "to write the outputs"
        ) from error


def _anatomy_and_check(
    run: TrainingRun, model: Model, state: TrainState, gradients: Any, ema: tuple[bool, float] | None
) -> tuple[records.Anatomy, dict[str, Any]]:
    """The anatomy of the saved weights, and the trained-what-it-claims check (``checks`` of the record)."""
    anatomy = _anatomy(run, model)
    changes = {layer["name"]: layer["frobenius"] for layer in anatomy.layers if layer["adapted"]}
    untrained = [name for name, module in model.components.items() if not trains(module)]
    check = check_trained(model, run.technique, state.trained_evidence, gradients, changes, ema,
                          frozen_scope=untrained if run.sharding else None)
    return anatomy, {"trained": asdict(check)}


def _ema_differs(run: TrainingRun) -> tuple[bool, float]:
    """(the EMA weights differ from the raw ones, the EMA's last decay), before the EMA is copied in."""
    raw = sharding.ema_tensors(run.accelerator, run.parameters)
    differs = any(not torch.equal(shadow.to(tensor), tensor) for shadow, tensor in zip(run.ema.shadow_params, raw))
    return differs, float(getattr(run.ema, "cur_decay_value", None) or 0.0)


def _anatomy(run: TrainingRun, model: Model) -> records.Anatomy:
    """The anatomy of the saved weights against the base model (reloaded only if a plain layer trained)."""
    experiment = run.experiment
    components = {name: model.components[name] for name in model.trainable_names()}
    weights = "the saved weights" + (", adapters merged through peft" if run.technique.kind != "full" else "")
    with torch.no_grad():
        return model_anatomy(
            components, base_lookup(lambda: experiment.family.load(experiment.model)), type(model),
            weights + (" (EMA weights)" if run.ema is not None else ""),
            compare=lambda layer: layer.weight.requires_grad,
        )


def _gathered_model(run: TrainingRun) -> Model:
    """Sharded runs: on rank 0, the model with its trained tensors gathered whole into a fresh copy of
    the base model, prepared by the technique as in training (so it saves exactly as one process)."""
    model = run.unwrapped_model()
    full = sharding.full_parameters(run.accelerator, model.components, run.parameters)  # every process takes part
    if not run.accelerator.is_main_process:
        return model
    fresh = run.experiment.family.load(run.experiment.model)
    run.technique.prepare(fresh)
    restore_parameters(trainable_named_parameters(fresh), full)
    trained = [name for name in fresh.trainable_names() if trains(fresh.components[name])]
    return model.replace(**{name: fresh.components[name] for name in trained})


def _with_original_frozen_parts(run: TrainingRun, model: Model) -> Model:
    """Frozen parts were cast to the compute dtype for speed; a technique that saves them (``full``
    writes a whole pipeline) gets the base model's own fp32 weights back instead of rounded ones."""
    if run.weight_dtype == torch.float32 or not run.technique.saves_frozen_parts:
        return model
    frozen = [name for name, module in model.components.items() if not trains(module)]
    if not frozen:
        return model
    original = run.experiment.family.load(run.experiment.model)
    return model.replace(**{name: original.components[name] for name in frozen})
