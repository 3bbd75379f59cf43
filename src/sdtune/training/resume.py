"""A run's checkpoints: written from, and restored into, its :class:`TrainingRun` and
:class:`TrainState` (the files themselves: :mod:`sdtune.training.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

from sdtune.training import optim, sharding
from sdtune.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sdtune.training.setup import TrainingRun
from sdtune.training.state import TrainState


def write_checkpoint(run: TrainingRun, state: TrainState) -> None:
    """Checkpoint the run after ``state.step`` (sharded tensors gathered whole: every process takes
    part; the main one writes the same files one process would)."""
    accelerator = run.accelerator
    if accelerator.is_main_process or run.sharding:
        components, groups = run.unwrapped_model().components, [list(names) for names in run.optimizer_groups]
        scaler = getattr(accelerator, "scaler", None)
        training_state = {
            "optimizer": sharding.full_optimizer_state(accelerator, components, run.parameters, run.optimizer, groups),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            "ema": sharding.full_ema_state(accelerator, run.parameters, run.ema),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": state.state_dict(),
        }
        trainable = sharding.full_parameters(accelerator, components, run.parameters)
    if accelerator.is_main_process:
        save_checkpoint(run.run_dir, state.step, trainable, training_state, run.config.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def restore_checkpoint(run: TrainingRun, checkpoint: Path, state: TrainState) -> None:
    """Put a checkpoint's weights, optimizer, schedule, EMA, scaler and loop state back into the run."""
    trainable, saved = load_checkpoint(checkpoint)
    layout = saved["state"].get("layout")
    if layout is not None and layout != state.layout:
        changed = ", ".join(f"{k} {layout[k]} → {state.layout[k]}" for k in layout if layout[k] != state.layout.get(k))
        raise CheckpointError(
            f"cannot resume {checkpoint}: {changed}; resume with the total batch (batch × accumulation × "
            "processes) and steps it was started with (the data order depends on them)"
        )
    accelerator = run.accelerator
    components, groups = run.unwrapped_model().components, [list(names) for names in run.optimizer_groups]
    sharding.load_training_state(
        accelerator, components, run.parameters, run.optimizer, trainable, saved["optimizer"], groups
    )
    optim.sync_offloaded(run.optimizer)
    run.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(sharding.shard_ema_state(accelerator, run.parameters, saved["ema"]))
        run.ema.to(accelerator.device)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    state.load_state_dict(saved["state"])
    state.resumed_from = [*state.resumed_from, str(checkpoint)]
    if accelerator.is_main_process:
        print(f"resumed from {checkpoint} at step {state.step}")
