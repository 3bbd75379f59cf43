"""The one training loop, shared by every technique and model family.

Read :func:`train_technique` top to bottom: claim the run folder, set up (:mod:`.setup`), resume,
then the loop (inputs → noise → timesteps → loss → backward, accumulated → clip → step → EMA), then
the outputs and the run record (:mod:`.finish`). The model family supplies the conditioning and
the denoiser call; the objective (DDPM or rectified flow, :mod:`sdtune.diffusion`) the timesteps,
noising, target and loss weights. Everything random in a step is drawn from (seed, process, step,
micro-step), and the data order from (seed, position), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtune import diffusion, records
from sdtune.errors import UserError
from sdtune.experiment import Experiment, output_root
from sdtune.models import Model
from sdtune.preflight import check_training
from sdtune.training import optim, sharding
from sdtune.training.checkpoint import CheckpointError, checkpoint_path, resolve_resume
from sdtune.training.evaluator import TrainingEvaluator
from sdtune.training.finish import finish_run, run_timing
from sdtune.training.resume import check_resume_settings, restore_checkpoint, write_checkpoint
from sdtune.training.run_dir import StopRequest, claim_run_dir, drop_replaced, release_run_dir
from sdtune.training.setup import TrainingRun, setup_run
from sdtune.training.state import TrainState
from sdtune.training.step import denoising_loss
from sdtune.training.trained_check import GradientWitness, gradients_observable, resume_failures
from sdtune.util.distributed import process_state
from sdtune.util.timing import StepClock


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # finished | interrupted
    record: dict[str, Any]
    model: Model | None = None  # the trained model, still in memory (EMA weights if used)


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite: the settings diverge (the message says which to change)."""


def check_finite_loss(loss: float, step: int) -> None:
    """A NaN or infinite loss stops the run with the settings to change."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"loss became {loss} at step {step}; lower train.learning_rate, or use bf16 instead of fp16")


def train_technique(
    experiment: Experiment,
    name: str,
    output_dir: str | Path | None = None,
    resume: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    after_step: Callable[[int], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train one technique of the experiment into ``OUTPUT/<name>/`` and write its record.

    The result keeps the trained model (``model``, EMA weights if used) for the caller. Everything
    that can be checked first is (:func:`sdtune.preflight.check_training`); a run that ``overwrite``
    replaces is set aside until this one finishes, and comes back if it fails. With ``stop_after``
    the run stops after that optimizer step as on Ctrl-C (evaluated there, checkpointed, status
    ``interrupted``): a scheduler such as ASHA compares trials at such steps and resumes the ones it
    keeps; resumed, the run is the same as one never stopped.
    """
    started = time.perf_counter()
    run_dir = output_root(experiment, output_dir) / name
    check_training(experiment, [name], output_dir, resume, overwrite)
    checkpoint, new = _claim(run_dir, resume, overwrite)
    if checkpoint is not None:  # what the file says, before anything loads (the rest: restore_checkpoint)
        check_resume_settings(experiment, name, checkpoint)
    main = process_state().is_main_process
    try:
        result = _train_claimed(experiment, name, run_dir, checkpoint, progress, after_step, started, stop_after)
    except BaseException:
        if main:
            release_run_dir(run_dir, new)
        raise
    if main and result.status == "finished":
        drop_replaced(run_dir)
    elif main:  # interrupted: resumable from its checkpoint
        release_run_dir(run_dir, new)
    return result


def _train_claimed(
    experiment: Experiment, name: str, run_dir: Path, checkpoint: Path | None, progress: bool,
    after_step: Callable[[int], None] | None, started: float, stop_after: int | None = None,
) -> TrainResult:
    """The run itself, in its claimed folder: set up, resume, the loop, the outputs and the record."""
    run = setup_run(experiment, name, run_dir, progress)
    config, accelerator, inputs = run.config, run.accelerator, run.inputs
    state = run.new_state()
    if checkpoint is not None:
        restore_checkpoint(run, checkpoint, state)
        _check_at_resume(run, state)
    run.start_trackers()
    first_step = state.step
    if stop_after is not None and stop_after <= first_step:
        raise CheckpointError(f"stop after step {stop_after}: {run_dir} is already at step {first_step}")
    inputs.start(first_step, run.max_steps, config.gradient_accumulation_steps, experiment.data.num_workers,
                 accelerator.num_processes, progress and accelerator.is_main_process)
    setup_time_s = time.perf_counter() - started
    evaluator = TrainingEvaluator.create(experiment, accelerator.is_main_process)  # None: nothing asked
    stop, clock, pending = StopRequest(), StepClock(accelerator.device), []  # pending: (step, loss, lr) not read back
    witness = GradientWitness(  # which trained tensors got a gradient (trained_check); idle once all have
        run.parameters, state.trained_evidence, run.technique, run.unwrapped_model().unreachable_parameters(), accelerator.device,
        observable=gradients_observable(config, sharding.is_deepspeed(accelerator)),
    )
    bar = _progress_bar(run.max_steps, first_step, progress and accelerator.is_main_process, name)
    records.reset_peak_memory(accelerator.device)
    for module in run.models:
        module.train()
    status = "finished"
    _write_progress(run, state, "running")
    clock.start()
    if evaluator is not None and first_step == 0:  # the starting point of the validation-loss curve
        with clock.excluded("evaluation"):
            evaluator.after_step(0, run, state)
    with stop.installed():
        for step in range(first_step, run.max_steps):
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(config.gradient_accumulation_steps):
                with accelerator.accumulate(*run.models):  # gradients sync on the last micro-step only
                    batch = inputs.micro_batch(step * config.gradient_accumulation_steps + micro)
                    # --- the objective (DDPM or rectified flow), in fp32; the family calls its denoiser ---
                    noise = diffusion.sample_noise(batch.latents, batch.generators, config.noise_offset)
                    timesteps = run.objective.sample_timesteps(batch.latents.shape[0], batch.generators, batch.latents.device)
                    loss = denoising_loss(
                        run.model, run.objective, batch.latents, noise, timesteps, batch.conditioning, mask=batch.mask,
                        num_instance=batch.num_instance, prior_loss_weight=config.prior_loss_weight,
                        input_dtype=run.input_dtype, autocast=accelerator.autocast(),
                    )
                    accelerator.backward(loss)  # (divided by the accumulation steps; DeepSpeed: by its engine)
                step_loss += loss.detach().float() / config.gradient_accumulation_steps
            witness.observe()
            lr = run.lr_scheduler.get_last_lr()[0]  # the rate this step uses
            if not config.fused_backward:  # (fused: each tensor stepped in the backward pass, optim.py)
                optim.clip_gradients(accelerator, run.optimizer, list(run.parameters.values()), config.max_grad_norm)
                run.optimizer.step()
            optim.step_scheduler(run.lr_scheduler, config.fused_backward)
            run.optimizer.zero_grad(set_to_none=True)
            if run.ema is not None:
                run.ema.step(sharding.ema_tensors(accelerator, run.parameters))
            done = state.step = step + 1
            pending.append((done, step_loss, lr))
            clock.step_done()
            if after_step is not None:
                after_step(done)
            # the device is synchronised only here: logging steps, checkpoints, a local Ctrl-C, the end
            periodic = bool(config.checkpointing_steps) and done % config.checkpointing_steps == 0 and done < run.max_steps
            scheduled_stop = stop_after is not None and done >= stop_after  # (the same in every process)
            stop_requested = stop.requested and accelerator.num_processes == 1 or scheduled_stop
            if done % config.log_every == 0 or done == run.max_steps or periodic or stop_requested:
                stop_requested = _sync_point(run, clock, pending, state, stop.requested, bar) or scheduled_stop
                witness.collect()
            bar.update(1)
            if evaluator is not None and (evaluator.due(done, run.max_steps) or scheduled_stop):  # validation loss, images
                with clock.excluded("evaluation"):
                    evaluator.after_step(done, run, state)
            interrupted = stop_requested and done < run.max_steps
            if interrupted or periodic:
                with clock.excluded():
                    write_checkpoint(run, state)
            if interrupted:
                status = "interrupted"
                break
    bar.close()
    accelerator.wait_for_everyone()
    state.train_time_s += clock.total_s  # (the last step ended at a sync point)
    if status == "finished" and not checkpoint_path(run_dir, state.step).is_dir():
        with clock.excluded():  # the final state on disk before any output is written (docs/resume.md)
            write_checkpoint(run, state, rotate=False)
    if run.block_swap is not None:
        run.block_swap.home()
    record, model = finish_run(run, status, state, run_timing(run, clock, state, first_step, setup_time_s), started, witness)
    _write_progress(run, state, status)  # after the record: a reader never sees "finished" without it
    for tracker in accelerator.trackers:  # (not end_training(): it would end the process group, which
        tracker.finish()  # the next technique or compare's evaluation in these processes still needs)
    accelerator.free_memory()
    return TrainResult(run_dir=run_dir, status=status, record=record, model=model)


def _check_at_resume(run: TrainingRun, state: TrainState) -> None:
    """The frozen tensors must be those the run started with (a changed base model is a failed item of
    the trained-what-it-claims check, reported now and in the record)."""
    failures = resume_failures(run.start_digests, state.trained_evidence.get("start", {}))
    if failures and run.accelerator.is_main_process:
        print(f"{run.name}: resumed on a base model whose frozen weights differ from the run's start "
              f"({len(failures)} tensors, e.g. {failures[0]['where']}); the check will fail")
    state.trained_evidence.setdefault("resume_failures", []).extend(failures)


def _claim(run_dir: Path, resume: str | bool | None, overwrite: bool) -> tuple[Path | None, bool]:
    """Claim the run folder on the main process only, then agree on the checkpoint everywhere;
    (the checkpoint to resume, whether the main process made the folder new)."""
    process = process_state()  # joins the launched processes into one group (gloo on CPUs)
    new = claim_run_dir(run_dir, resume, overwrite) if process.is_main_process else False
    process.wait_for_everyone()
    return resolve_resume(run_dir, resume), new


def _sync_point(
    run: TrainingRun, clock: StepClock, pending: list, state: TrainState, stop_requested: bool, bar: Any
) -> bool:
    """Synchronise the device; read back the pending steps' losses (mean over processes) in one
    transfer, check them, record and log them; return whether any process was asked to stop."""
    accelerator = run.accelerator
    clock.sync_point(encoded_s=run.inputs.encode_time_s)
    losses = torch.stack([loss for _, loss, _ in pending] + [torch.tensor(float(stop_requested), device=accelerator.device)])
    gathered = accelerator.gather(losses.reshape(1, -1)).reshape(accelerator.num_processes, -1)
    values = gathered[:, :-1].mean(dim=0).tolist()
    any_stop = bool(gathered[:, -1].max().item() > 0)
    for (done, _, lr), loss in zip(pending, values):
        check_finite_loss(loss, done)
        state.loss_history.append({"step": done, "loss": loss, "lr": lr})
        accelerator.log({"train/loss": loss, "train/lr": lr}, step=done)
    if pending:
        seconds = clock.intervals[-1][1] / clock.intervals[-1][0] if clock.intervals else 0.0
        rate = run.images_per_step / seconds if seconds else 0.0
        bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{pending[-1][2]:.2e}", img_s=f"{rate:.2f}")
    pending.clear()
    _write_progress(run, state, "running")
    return any_stop


def _write_progress(run: TrainingRun, state: TrainState, status: str) -> None:
    """``RUN/progress.json`` for the live report; at sync points only (a small atomic write, main process)."""
    if run.accelerator.is_main_process:
        records.write_progress(run.run_dir, records.RunProgress(state.step, run.max_steps, status))


def _progress_bar(total: int, initial: int, enabled: bool, name: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=f"train {name}", unit="step")
