"""A run's checkpoints: written from, and restored into, its :class:`TrainingRun` and
:class:`TrainState` (the files themselves: :mod:`sdtune.training.checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.experiment import Experiment
from sdtune.training import optim, sharding
from sdtune.training.checkpoint import CheckpointError, load_checkpoint, read_saved_state, save_checkpoint
from sdtune.training.fingerprint import Change, RunFingerprint, compare
from sdtune.training.setup import TrainingRun
from sdtune.training.state import TrainState


class ResumeMismatchError(CheckpointError):
    """The run being resumed is set up differently from the run its checkpoint was written by."""


def write_checkpoint(run: TrainingRun, state: TrainState, rotate: bool = True) -> None:
    """Checkpoint the run after ``state.step`` (sharded tensors gathered whole: every process takes
    part; the main one writes the same files one process would). ``rotate``: then remove all but the
    newest ``train.checkpoints_total_limit`` (the final state's checkpoint rotates nothing)."""
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
        save_checkpoint(run.run_dir, state.step, trainable, training_state, run.config.checkpoints_total_limit if rotate else None)
    accelerator.wait_for_everyone()


def restore_checkpoint(run: TrainingRun, checkpoint: Path, state: TrainState) -> None:
    """Put a checkpoint's weights, optimizer, schedule, EMA, scaler and loop state back into the run."""
    trainable, saved = load_checkpoint(checkpoint)
    accepted = check_settings(saved["state"], state.fingerprint, checkpoint)
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
    fingerprint = state.fingerprint
    state.load_state_dict(saved["state"])
    state.resumed_from = [*state.resumed_from, str(checkpoint)]
    state.changed_on_resume = [*state.changed_on_resume, *(change.as_record(state.step) for change in accepted)]
    state.fingerprint = fingerprint  # the next resume compares with the settings of this session
    if accelerator.is_main_process:
        print(f"resumed from {checkpoint} at step {state.step}")
        for change in accepted:
            print(f"changed on resume: {change.describe()}")


def check_resume_settings(experiment: Experiment, name: str, checkpoint: Path) -> None:
    """Before anything loads: refuse a resume whose experiment file differs from the checkpoint's
    run in a setting that shapes it (the rest is compared once the run is set up)."""
    check_settings(read_saved_state(checkpoint), RunFingerprint.of_config(experiment, name).flat(), checkpoint)


def check_settings(saved_state: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> list[Change]:
    """The accepted changes between a checkpoint's loop state and the resumed run's fingerprint;
    a refused one ends in one line naming every differing key, its two values and the ways out."""
    saved = saved_state.get("fingerprint") or _legacy_fingerprint(saved_state.get("layout"))
    refused, accepted = compare(saved, current, int(saved_state.get("step", 0)))
    if refused:
        listed = "; ".join(change.describe() for change in refused)
        raise ResumeMismatchError(
            f"cannot resume {checkpoint.parent.parent} from {checkpoint.name}: {listed} (the checkpoint's run → this "
            "one); resume with the settings it was started with, or start a new run with --overwrite (replaces "
            "this one) or --output DIR"
        )
    return accepted


def _legacy_fingerprint(layout: dict[str, int] | None) -> dict[str, Any]:
    """What a checkpoint written before fingerprints kept: the total batch and the length."""
    if not layout:
        return {}
    return {"run.total_batch": layout["total_batch"], "run.max_steps": layout["max_steps"]}
