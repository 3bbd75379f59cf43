"""The one training loop, shared by every technique and model family.

Read :func:`train_technique` top to bottom: setup, then the loop (noise → timesteps → add noise →
predict → target → loss → backward → clip → step), then the outputs and the run record. The
model family supplies the conditioning and the denoiser call; the objective (DDPM or rectified
flow, :mod:`sdtune.diffusion`) supplies timesteps, noising, target and loss weights. Everything random in a step is drawn from (seed, process, step, micro-step), and the
data order from (seed, position), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtune import diffusion, records
from sdtune.config.sections import ConfigError, Experiment, TrainConfig
from sdtune.data.batches import Layout, MicroBatch, PixelBatches, latent_masks, pixel_loader, pixel_needs
from sdtune.data.buckets import pixel_stride
from sdtune.data.dataset import TrainingSet, prepare_training_set
from sdtune.data import cache as cache_lib
from sdtune.errors import UserError
from sdtune.models import Conditioning, ModelBundle, family_for
from sdtune.runner.isolate import train_in_fresh_process
from sdtune.techniques import TECHNIQUES, Technique, trainable_named_parameters
from sdtune.training import prior as prior_lib
from sdtune.training import sharding
from sdtune.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_resume,
    restore_parameters,
    save_checkpoint,
)
from sdtune.training.evaluator import TrainingEvaluator
from sdtune.training.run_dir import RunExistsError, StopRequest, claim_run_dir, flat_scalars, train_record
from sdtune.util.distributed import launched_processes, on_cpu, process_state
from sdtune.util.timing import StepClock, synchronize

__all__ = ["RunExistsError", "TrainResult", "has_fused_adamw", "output_root", "train", "train_technique"]


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # finished | interrupted
    record: dict[str, Any]
    bundle: ModelBundle | None = None  # the trained model, still in memory (EMA weights if used)


@dataclass
class StepContext:
    """Everything a training step reads; built once by :func:`_setup`."""

    config: TrainConfig
    bundle: ModelBundle
    technique: Technique
    accelerator: Any
    training_set: TrainingSet
    latent_cache: cache_lib.LatentCache | None
    parameters: dict[str, torch.nn.Parameter]
    weight_dtype: torch.dtype
    objective: diffusion.DDPMObjective | diffusion.FlowMatchingObjective
    latent_scale: float
    latent_shift: float
    train_text_encoder: bool  # a text encoder trains: conditioning is encoded every step, with gradients
    models: list[torch.nn.Module]  # the (wrapped) models that train
    images_per_step: int  # batch × accumulation × processes
    layout: Layout  # what each micro-batch holds (pure in its position)
    timing: dict[str, float]  # setup split: model load, data, cache
    empty_conditioning: Conditioning | None = None
    sharding: str | None = None  # fsdp2 | deepspeed: trained tensors are sharded (see sdtune.training.sharding)
    prior: prior_lib.PriorSamples | None = None  # DreamBooth's class samples (prior_preservation)
    input_dtype: torch.dtype = torch.float32  # of the denoiser's inputs (DeepSpeed bf16: bf16)
    optimizer_groups: list[list[str]] = dataclasses.field(default_factory=list)  # trained names per param group


def train(
    experiment: Experiment,
    techniques: list[str] | None = None,
    output_dir: str | Path | None = None,
    resume: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    isolate: bool | None = None,
    on_result: Callable[[TrainResult], None] | None = None,
) -> list[TrainResult]:
    """Train the named techniques (default: all of the experiment) one after the other.

    With several techniques each trains in a fresh process (``isolate``, see :mod:`sdtune.runner.isolate`),
    so its time, memory and flags are its own; a single one trains in this process, and so do all
    under a launcher (torchrun / accelerate launch: the launched processes are the ones that train;
    ``sdtune compare --plan`` gives one command per technique to launch separately). With
    ``resume``, techniques that already finished are skipped; a checkpoint path needs exactly one
    technique. The returned results do not keep the models (see :func:`train_technique`);
    ``on_result`` sees each one as soon as its technique ends.
    """
    names = techniques or list(experiment.techniques)
    for name in names:
        if name not in experiment.techniques:
            raise ConfigError(
                f"--technique {name!r} is not in the experiment; it has: {', '.join(experiment.techniques)}"
            )
    if resume not in (None, False, True, "latest") and len(names) != 1:
        raise CheckpointError("--resume PATH names one run's checkpoint: add --technique NAME")
    results = []
    for name in names:
        run_dir = output_root(experiment, output_dir) / name
        finished = (records.read_record(run_dir) or {}).get("status") == "finished"
        if resume and finished and not overwrite:
            print(f"{name}: already finished in {run_dir}; skipped")
            continue
        if isolate if isolate is not None else len(names) > 1 and launched_processes() == 1:
            record = train_in_fresh_process(experiment, name, output_root(experiment, output_dir), resume, overwrite, progress)
            result = TrainResult(run_dir=run_dir, status=record["status"], record=record)
        else:
            result = train_technique(experiment, name, output_dir, resume, overwrite, progress)
            result.bundle = None  # the caller gets records, not models
        results.append(result)
        if on_result is not None:
            on_result(result)
        if result.status != "finished":
            break
    return results


def output_root(experiment: Experiment, output_dir: str | Path | None) -> Path:
    return Path(output_dir or experiment.output_dir or Path("runs") / experiment.name)


def train_technique(
    experiment: Experiment,
    name: str,
    output_dir: str | Path | None = None,
    resume: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train one technique of the experiment into ``OUTPUT/<name>/`` and write its record.

    The result keeps the trained model (``bundle``, EMA weights if used) for the caller.
    """
    started = time.perf_counter()
    run_dir = output_root(experiment, output_dir) / name
    checkpoint = _claim(run_dir, resume, overwrite)
    ctx = _setup(experiment, name, run_dir, progress)
    cfg, accelerator = ctx.config, ctx.accelerator
    optimizer, lr_scheduler, ema, max_steps = _optimisation(ctx)
    state = {"step": 0, "loss_history": [], "train_time_s": 0.0, "resumed_from": [], "layout": _layout(ctx, max_steps)}
    if checkpoint is not None:
        state = _resume(ctx, checkpoint, optimizer, lr_scheduler, ema, state)
    batches = _pixel_batches(ctx, state["step"], max_steps)
    ctx.timing["setup_time_s"] = time.perf_counter() - started
    evaluator = TrainingEvaluator.create(experiment, run_dir, accelerator.is_main_process)  # None: nothing asked
    stop = StopRequest()
    bar = _progress_bar(max_steps, state["step"], progress and accelerator.is_main_process, name)
    records.reset_peak_memory(accelerator.device)
    models, objective, family = ctx.models, ctx.objective, ctx.bundle.family
    for model in models:
        model.train()
    clock, pending = StepClock(accelerator.device), []  # pending: (step, loss on the device, lr) not read back yet
    status, first_step = "finished", state["step"]
    if evaluator is not None and first_step == 0:  # the starting point of the validation-loss curve
        evaluator.after_step(0, max_steps, ctx, _unwrapped(ctx), ema, state)
    clock.start()
    with stop.installed():
        for step in range(first_step, max_steps):
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(cfg.gradient_accumulation_steps):
                last_micro = micro == cfg.gradient_accumulation_steps - 1
                with _no_sync(accelerator, models, skip=last_micro):  # all-reduce on the last only
                    batch = ctx.layout.plan(step * cfg.gradient_accumulation_steps + micro)
                    generators = _sample_generators(ctx, batch)  # one per sample, from its global position
                    latents, conditioning = _micro_batch(ctx, batch, next(batches), generators)
                    mask = latent_masks(ctx.training_set, batch, latents)  # None without loss masks
                    if ctx.prior is not None:  # DreamBooth: as many class samples, after the instance ones
                        latents, conditioning, generators = ctx.prior.extend(ctx, batch, latents, conditioning, generators)
                    # --- the objective (DDPM or rectified flow), in fp32; the family calls its denoiser ---
                    noise = diffusion.sample_noise(latents, generators, cfg.noise_offset)
                    timesteps = objective.sample_timesteps(latents.shape[0], generators, latents.device)
                    noisy_latents = objective.noisy_latents(latents, noise, timesteps)
                    target = objective.target(latents, noise, timesteps)
                    # DeepSpeed's bf16 engine takes its inputs in bf16 (elsewhere fp32: autocast casts)
                    model_input = noisy_latents.to(ctx.input_dtype)
                    with accelerator.autocast():  # (prepare() wraps trained models only; a frozen denoiser too)
                        prediction = family.predict(
                            ctx.bundle, model_input, timesteps, sharding.as_dtype(conditioning, ctx.input_dtype)
                        )
                    if ctx.prior is None:
                        loss = diffusion.diffusion_loss(prediction, target, objective.loss_weights(timesteps), mask)
                    else:  # instance loss + λ × prior loss (Ruiz et al. 2023, eq. 2)
                        loss = prior_lib.prior_preservation_loss(
                            prediction, target, objective.loss_weights(timesteps), len(batch.indices), cfg.prior_loss_weight, mask
                        )
                    sharding.backward(accelerator, loss, cfg.gradient_accumulation_steps, last_micro)
                step_loss += loss.detach().float() / cfg.gradient_accumulation_steps
            accelerator.clip_grad_norm_(list(ctx.parameters.values()), cfg.max_grad_norm)
            lr = lr_scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(sharding.ema_tensors(accelerator, ctx.parameters))
            done = step + 1
            state["step"] = done
            pending.append((done, step_loss, lr))
            clock.step_done()
            if after_step is not None:
                after_step(done)
            # the device is synchronised only here: logging steps, checkpoints, a local Ctrl-C, the end
            periodic = bool(cfg.checkpointing_steps) and done % cfg.checkpointing_steps == 0 and done < max_steps
            stop_requested = stop.requested and accelerator.num_processes == 1
            if done % cfg.log_every == 0 or done == max_steps or periodic or stop_requested:
                stop_requested = _sync_point(ctx, clock, pending, state, stop.requested, bar)
            bar.update(1)
            if evaluator is not None and evaluator.due(done, max_steps):  # validation loss, images (sdtune.training.evaluator)
                with clock.excluded():
                    evaluator.after_step(done, max_steps, ctx, _unwrapped(ctx), ema, state)
            interrupted = stop_requested and done < max_steps
            if interrupted or periodic:
                with clock.excluded():
                    _write_checkpoint(ctx, run_dir, done, optimizer, lr_scheduler, ema, state)
            if interrupted:
                status = "interrupted"
                break
    bar.close()
    accelerator.wait_for_everyone()
    state["train_time_s"] += clock.total_s
    timing = _timing(ctx, clock, state, first_step)
    record = _finish(ctx, experiment, name, run_dir, status, state, ema, timing, max_steps, started)
    for tracker in accelerator.trackers:  # (not end_training(): it would end the process group, which
        tracker.finish()  # the next technique or compare's evaluation in these processes still needs)
    bundle = _unwrapped(ctx)
    accelerator.free_memory()
    return TrainResult(run_dir=run_dir, status=status, record=record, bundle=bundle)


def _sync_point(ctx: StepContext, clock: StepClock, pending: list, state: dict, stop_requested: bool, bar: Any) -> bool:
    """Synchronise the device; read back the pending steps' losses (mean over processes) in one
    transfer, check them, record and log them; return whether any process was asked to stop."""
    accelerator = ctx.accelerator
    encode_s = ctx.latent_cache.encode_time_s if ctx.latent_cache is not None else 0.0
    clock.sync_point(minus_s=encode_s - ctx.timing.get("_encode_seen_s", 0.0))
    ctx.timing["_encode_seen_s"] = encode_s
    losses = torch.stack([loss for _, loss, _ in pending] + [torch.tensor(float(stop_requested), device=accelerator.device)])
    gathered = accelerator.gather(losses.reshape(1, -1)).reshape(accelerator.num_processes, -1)
    values = gathered[:, :-1].mean(dim=0).tolist()
    any_stop = bool(gathered[:, -1].max().item() > 0)
    for (done, _, lr), loss in zip(pending, values):
        _check_finite(loss, done)
        state["loss_history"].append({"step": done, "loss": loss, "lr": lr})
        accelerator.log({"train/loss": loss, "train/lr": lr}, step=done)
    if pending:
        seconds = clock.intervals[-1][1] / clock.intervals[-1][0] if clock.intervals else 0.0
        rate = ctx.images_per_step / seconds if seconds else 0.0
        bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{pending[-1][2]:.2e}", img_s=f"{rate:.2f}")
    pending.clear()
    return any_stop


def _timing(ctx: StepContext, clock: StepClock, state: dict, first_step: int) -> dict[str, Any]:
    """Setup (model load, data, cache), loop time (device-synchronised, checkpoint writes excluded),
    first-use encodes, and the steady-state rate once every sample the run uses is cached."""
    steps = max(state["step"] - first_step, 1)
    cache = ctx.latent_cache
    encode_s = cache.encode_time_s if cache is not None else 0.0
    steady = clock.steady_s_per_step()
    timing = {k: v for k, v in ctx.timing.items() if not k.startswith("_")}
    return {
        **timing,
        "train_time_s": state["train_time_s"],  # every session of the run (resumed ones added up)
        "session_train_time_s": clock.total_s,
        "checkpoint_time_s": clock.excluded_s,
        "encode_time_s": encode_s,  # first-use VAE/text encodes inside the loop
        "encoded_images": cache.encoded_images if cache is not None else None,
        "images_per_step": ctx.images_per_step,
        "s_per_step_session": clock.total_s / steps,
        "steady_s_per_step": steady,
        "steady_images_per_s": ctx.images_per_step / steady if steady else None,
        "host_syncs": clock.syncs,
    }


def _claim(run_dir: Path, resume: str | bool | None, overwrite: bool) -> Path | None:
    """Claim the run folder on the main process only, then agree on the checkpoint everywhere."""
    state = process_state()  # joins the launched processes into one group (gloo on CPUs)
    if state.is_main_process:
        claim_run_dir(run_dir, resume, overwrite)
    state.wait_for_everyone()
    return resolve_resume(run_dir, resume)


# ----------------------------------------------------------------------------------------------
# Setup


def _setup(experiment: Experiment, name: str, run_dir: Path, progress: bool) -> StepContext:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    cfg = experiment.train_config_for(name)
    spec = experiment.techniques[name]
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: 'fp16' needs a CUDA GPU; use 'bf16' or 'no' here")
    gc.collect()  # the previous technique's model, if the caller dropped it
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # in-process use only (the CLI and compare train each technique in a fresh process): techniques
    # of one file may differ in mixed precision, which accelerate's singleton state would refuse
    AcceleratorState._reset_state()
    sharding.before_accelerator()
    accelerator = Accelerator(
        cpu=on_cpu(),
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    sharding.load_whole(accelerator)  # (ZeRO-3: no partitioned loading; the engine partitions what trains)
    if torch.cuda.is_available():  # set either way: a flag left on by an earlier run must not leak in
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    timing, started = {}, time.perf_counter()
    family = family_for(experiment.model)
    bundle = family.load(experiment.model)
    # DreamBooth: the class images come from the base model, before the technique changes it
    prior = prior_lib.setup(experiment, cfg, bundle, run_dir.parent, accelerator, progress, timing)
    started += timing.get("class_images_time_s", 0.0)  # (not model loading)
    technique = TECHNIQUES.get(spec.kind)(spec.options)
    torch.manual_seed(cfg.seed)  # adapter initialisation is random: same seed, same start
    technique.prepare(bundle)
    trained = [name for name in bundle.trainable_names() if _trains(bundle.components[name])]
    sharded = sharding.configure(accelerator, cfg)  # FSDP2 / DeepSpeed when launched with them
    for name, module in bundle.components.items():
        frozen_dtype = torch.float32 if name == "vae" and family.vae_in_fp32 else weight_dtype
        for parameter in module.parameters():  # frozen weights in the compute dtype, trained ones fp32
            parameter.data = parameter.data.to(accelerator.device, torch.float32 if parameter.requires_grad else frozen_dtype)
        module.to(accelerator.device)
    if cfg.channels_last:
        bundle.denoiser.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        bundle.denoiser.enable_gradient_checkpointing()
        for name in trained:
            if name != family.denoiser:
                bundle.components[name].gradient_checkpointing_enable()
    synchronize(accelerator.device)
    timing["model_load_time_s"], started = time.perf_counter() - started, time.perf_counter()
    training_set = prepare_training_set(experiment.data, progress and accelerator.is_main_process, pixel_stride(bundle))
    images_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    training_set.captions = technique.training_captions(training_set.captions)
    timing["data_setup_time_s"], started = time.perf_counter() - started, time.perf_counter()
    data = experiment.data
    ctx = StepContext(
        config=cfg,
        bundle=bundle,
        technique=technique,
        accelerator=accelerator,
        training_set=training_set,
        latent_cache=None,
        parameters={},
        weight_dtype=weight_dtype,
        objective=family.training_objective(bundle, cfg),
        latent_scale=family.latent_scale(bundle),
        latent_shift=family.latent_shift(bundle),
        train_text_encoder=any(name != family.denoiser for name in trained),
        models=[],
        images_per_step=images_per_step,
        layout=Layout(
            seed=cfg.seed, num_samples=training_set.num_slots, batch_size=cfg.batch_size,
            accumulation=cfg.gradient_accumulation_steps, num_processes=accelerator.num_processes,
            process_index=accelerator.process_index, random_flip=data.random_flip, center_crop=data.center_crop,
            caption_dropout=cfg.caption_dropout, order=training_set.bucket_order(cfg.seed, images_per_step),
            slot_images=training_set.slot_images(),
        ),
        timing=timing,
        sharding=sharded,
        prior=prior,
        input_dtype=sharding.input_dtype(accelerator, weight_dtype),
    )
    ctx.latent_cache = _latent_cache(ctx, experiment, run_dir.parent)
    timing["cache_open_time_s"] = time.perf_counter() - started
    if cfg.compile:
        bundle.components[family.denoiser] = torch.compile(bundle.denoiser)
    ctx.models = [bundle.components[name] for name in trained]  # prepared with the optimizer (_optimisation)
    ctx.parameters = trainable_named_parameters(_unwrapped(ctx))
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune", config=flat_scalars(dataclasses.asdict(cfg)))
    return ctx


def has_fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for this device (CUDA; the CPU since torch 2.4)."""
    if device.type == "cuda":
        return True
    release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return device.type == "cpu" and release >= (2, 4)


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _latent_cache(ctx: StepContext, experiment: Experiment, output_root: Path) -> cache_lib.LatentCache | None:
    """The lazily filled cache of posteriors (and text conditioning when no text encoder trains), or
    None on the uncached path (random crops change every epoch; ``cache: off``).

    ``auto`` shares a disk cache between the techniques of an experiment (each trains in its own
    process) and keeps a single technique's cache in memory unless it would exceed the limit."""
    data = experiment.data
    mode = data.cache
    if mode == "off" or (mode == "auto" and not data.center_crop):
        return None
    bundle, family = ctx.bundle, ctx.bundle.family
    caches_texts = not ctx.train_text_encoder and not data.shuffle_captions  # (shuffled: a new caption each epoch)
    if mode == "auto":
        text_numel = 0
        if caches_texts:  # from the real shapes (SD3's T5 states dwarf SD1's CLIP states)
            with torch.no_grad():
                text_numel = sum(t[0].numel() for t in family.encode_prompt(bundle, ["probe"]).values())
        variants = 2 if data.random_flip else 1
        latent_side = data.resolution // family.vae_downsampling(bundle)
        latent_numel = family.latent_channels(bundle) * latent_side**2
        estimate = cache_lib.estimate_bytes(len(ctx.training_set), latent_numel, variants, text_numel)
        shared = len(experiment.techniques) > 1
        mode = "disk" if shared or estimate > data.cache_memory_limit_gb * 1e9 else "memory"
    described = {
        "model": dataclasses.asdict(experiment.model),
        "data": {k: v for k, v in dataclasses.asdict(data).items() if k not in ("cache", "num_workers")},
        "texts": caches_texts,
        "dtype": str(ctx.weight_dtype),
        "rows": ctx.training_set.indices,
    }
    key = cache_lib.cache_key(described)
    return cache_lib.open_cache(key, mode, output_root / ".cache", caches_texts, described)


def _pixel_batches(ctx: StepContext, first_step: int, max_steps: int) -> Any:
    """An iterator over the micro-batches' decoded images from ``first_step`` on (see sdtune.data.batches)."""
    accumulation = ctx.config.gradient_accumulation_steps
    start, count = first_step * accumulation, (max_steps - first_step) * accumulation
    cache = ctx.latent_cache
    needs = pixel_needs(ctx.layout, start, count, None if cache is None else cache.has_posterior)
    workers = ctx.training_set.config.num_workers
    if workers is None:  # auto: decoding beside training pays only with cores to spare
        per_process = (os.cpu_count() or 1) // ctx.accelerator.num_processes
        workers = 0 if per_process <= 2 else min(8, per_process - 1)
    if not any(needs):
        workers = 0  # everything is cached already
    dataset = PixelBatches(ctx.training_set, ctx.layout, start, needs)
    return iter(pixel_loader(dataset, workers, pin_memory=ctx.accelerator.device.type == "cuda"))


def _optimisation(ctx: StepContext) -> tuple[Any, Any, Any, int]:
    """Optimizer (AdamW), LR schedule (diffusers), optional EMA, and the number of steps."""
    from diffusers.optimization import get_scheduler

    from sdtune.training.ema import LerpEMA

    cfg, accelerator = ctx.config, ctx.accelerator
    max_steps = cfg.max_train_steps or ctx.layout.steps_for_epochs(cfg.num_epochs)
    learning_rate = cfg.learning_rate * (ctx.images_per_step if cfg.scale_lr else 1)
    text_lr = ctx.technique.options.text_encoder_learning_rate or learning_rate
    denoiser = ctx.bundle.family.denoiser + "."
    groups = [  # the technique may split each further (LoRA+); the order is fixed, so resume restores it
        *ctx.technique.parameter_groups({n: p for n, p in ctx.parameters.items() if n.startswith(denoiser)}, learning_rate),
        *ctx.technique.parameter_groups({n: p for n, p in ctx.parameters.items() if not n.startswith(denoiser)}, text_lr),
    ]
    optimizer_cls, kernel = torch.optim.AdamW, {}
    if cfg.use_8bit_adam:  # the config check made sure bitsandbytes imports
        import bitsandbytes

        optimizer_cls = bitsandbytes.optim.AdamW8bit
    elif has_fused_adamw(accelerator.device):
        # one pass over each tensor (torch's default on the CPU is a per-tensor loop of ~10 ops: on SD
        # 1.5's 860 M UNet weights 3.76 s per step instead of 0.77 s on this project's CPU machines)
        kernel = {"fused": True}
    optimizer = optimizer_cls(
        groups,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        **kernel,
    )
    # models and optimizer prepared together: FSDP2 replaces the parameters the optimizer holds
    trained = {name: ctx.bundle.components[name] for name in ctx.bundle.trainable_names() if _trains(ctx.bundle.components[name])}
    names = {id(parameter): name for name, parameter in ctx.parameters.items()}
    ctx.optimizer_groups = [[names[id(parameter)] for parameter in group["params"]] for group in optimizer.param_groups]
    called, ctx.models, optimizer = sharding.prepare(accelerator, trained, optimizer, ctx.sharding)
    ctx.bundle = ctx.bundle.replace(**called)
    ctx.parameters = trainable_named_parameters(_unwrapped(ctx))
    # stepped once per optimizer step by the loop itself (not prepared: no per-process scaling)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=max_steps
    )
    ema = None
    if cfg.use_ema:  # one lerp per tensor (sdtune.training.ema); multi-tensor on CUDA only: on the CPU it is no faster
        # (DeepSpeed: over its fp32 master weights, each process its fragment: see sdtune.training.sharding)
        ema = LerpEMA(sharding.ema_tensors(accelerator, ctx.parameters), decay=cfg.ema_decay, foreach=accelerator.device.type == "cuda")
        ema.to(accelerator.device)
    return optimizer, lr_scheduler, ema, max_steps


# ----------------------------------------------------------------------------------------------
# One micro-batch


def _sample_generators(ctx: StepContext, batch: MicroBatch) -> list[torch.Generator]:
    """A generator per sample, seeded from (seed, the sample's global position): the sample's latent,
    noise and timestep are the same whatever process or micro-step it lands in, so 1 process with
    batch 2B, 2 processes with B, and 1 process with B × 2 accumulation draw the same. Module
    dropout (peft's ``lora_dropout``) uses torch's global generator, seeded here per (seed, micro-step,
    process): replayed exactly on resume, but not the same across process counts."""
    seed, device = ctx.config.seed, ctx.accelerator.device
    torch.manual_seed(_derive(seed, batch.global_micro, ctx.accelerator.process_index, 1))
    return [torch.Generator(device=device).manual_seed(_derive(seed, position)) for position in batch.positions]


def _derive(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def _micro_batch(
    ctx: StepContext, batch: MicroBatch, pixels: dict[str, Any], generators: list[torch.Generator]
) -> tuple[torch.Tensor, Conditioning]:
    """Latents and conditioning of this process's share of a micro-step (deterministic); ``pixels``
    is the loader's item: the decoded images of the positions that are not cached."""
    if pixels["global_micro"] != batch.global_micro:
        raise RuntimeError(f"input pipeline out of step: got micro-batch {pixels['global_micro']}, expected {batch.global_micro}")
    device, bundle, family = ctx.accelerator.device, ctx.bundle, ctx.bundle.family
    decoded = {position: image for position, image in zip(pixels["positions"], pixels["pixels"])}
    if ctx.latent_cache is None:
        mean, std = family.encode_images(bundle, pixels["pixels"].to(device, non_blocking=True))
    else:
        posteriors = [
            _cached_posterior(ctx, index, flip, decoded.get(position))
            for position, (index, flip) in enumerate(zip(batch.indices, batch.flips))
        ]
        mean, std = (torch.stack(parts).to(device, non_blocking=True) for parts in zip(*posteriors))
    latents = diffusion.sample_latents(mean.float(), std.float(), ctx.latent_scale, generators, ctx.latent_shift)
    if ctx.latent_cache is not None and ctx.latent_cache.caches_texts:
        rows = [_cached_text(ctx, index) for index in batch.indices]
        conditioning = {k: torch.stack([r[k] for r in rows]).to(device, ctx.weight_dtype) for k in rows[0]}
        for row, drop in enumerate(batch.dropped):
            if drop:
                for name, empty in _empty_conditioning(ctx).items():
                    conditioning[name][row] = empty.to(conditioning[name].dtype)
    else:
        captions = [
            "" if drop else ctx.training_set.caption(i, ctx.config.seed, epoch, slot)
            for i, drop, epoch, slot in zip(batch.indices, batch.dropped, batch.epochs, batch.slots)
        ]
        with contextlib.nullcontext() if ctx.train_text_encoder else torch.no_grad():
            conditioning = family.encode_prompt(bundle, captions)
    geometry = [ctx.training_set.geometry(i, f, c) for i, f, c in zip(batch.indices, batch.flips, batch.crops)]
    conditioning.update(family.image_conditioning(torch.tensor(geometry, dtype=ctx.weight_dtype).to(device)))
    return latents, conditioning  # fp32 latents: the noising maths stays exact; autocast feeds the denoiser


def _cached_posterior(ctx: StepContext, index: int, flip: bool, pixels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached (mean, std) of an (image, flip) pair, encoded alone on its first use."""
    cache = ctx.latent_cache
    found = cache.posterior(index, flip)
    if found is not None:
        return found
    if pixels is None:  # planned as cached, but not there (a disk cache another run is filling)
        pixels = ctx.training_set.pixels(index, flip, None)
    with _encode_timer(ctx):
        mean, std = ctx.bundle.family.encode_images(ctx.bundle, pixels[None].to(ctx.accelerator.device))
    cache.encoded_images += 1
    return cache.put_posterior(index, flip, mean[0], std[0])  # (no read back of what was just written)


def _cached_text(ctx: StepContext, index: int) -> Conditioning:
    """The cached text conditioning of a sample's caption, encoded alone on its first use."""
    cache = ctx.latent_cache
    found = cache.text(index)
    if found is None:
        with _encode_timer(ctx), torch.no_grad():
            encoded = ctx.bundle.family.encode_prompt(ctx.bundle, [ctx.training_set.captions[index]])
        cache.encoded_texts += 1
        found = cache.put_text(index, {name: value[0] for name, value in encoded.items()})
    return found


@contextlib.contextmanager
def _encode_timer(ctx: StepContext):
    """Time a first-use encode on the device clock (so steady-state step time can leave it out)."""
    synchronize(ctx.accelerator.device)
    started = time.perf_counter()
    yield
    synchronize(ctx.accelerator.device)
    ctx.latent_cache.encode_time_s += time.perf_counter() - started


def _empty_conditioning(ctx: StepContext) -> Conditioning:
    """The frozen text encoders' conditioning for "" (computed once; used for dropped captions)."""
    if ctx.empty_conditioning is None:
        with torch.no_grad():
            encoded = ctx.bundle.family.encode_prompt(ctx.bundle, [""])
        ctx.empty_conditioning = {name: value[0] for name, value in encoded.items()}
    return ctx.empty_conditioning


@contextlib.contextmanager
def _no_sync(accelerator: Any, models: list[torch.nn.Module], skip: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if skip or accelerator.num_processes == 1 or sharding.is_deepspeed(accelerator):  # DeepSpeed: its own
        yield
        return
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
        yield


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite: the settings diverge (the message says which to change)."""


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss} at step {step}; lower train.learning_rate, or use bf16 instead of fp16"
        )


# ----------------------------------------------------------------------------------------------
# Checkpoints, interruption, outputs


def _resume(ctx: StepContext, checkpoint: Path, optimizer: Any, lr_scheduler: Any, ema: Any, state: dict) -> dict:
    trainable, saved = load_checkpoint(checkpoint)
    layout = saved["state"].get("layout")
    if layout is not None and layout != state["layout"]:
        changed = ", ".join(f"{k} {layout[k]} → {state['layout'][k]}" for k in layout if layout[k] != state["layout"].get(k))
        raise CheckpointError(
            f"cannot resume {checkpoint}: {changed}; resume with the total batch (batch × accumulation × "
            "processes) and steps it was started with (the data order depends on them)"
        )
    sharding.load_training_state(ctx.accelerator, ctx.parameters, optimizer, trainable, saved["optimizer"], ctx.optimizer_groups)
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(sharding.shard_ema_state(ctx.accelerator, ctx.parameters, saved["ema"]))
        ema.to(ctx.accelerator.device)
    scaler = getattr(ctx.accelerator, "scaler", None)
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    state = dict(saved["state"])
    state["resumed_from"] = [*state.get("resumed_from", []), str(checkpoint)]
    if ctx.accelerator.is_main_process:
        print(f"resumed from {checkpoint} at step {state['step']}")
    return state


def _layout(ctx: StepContext, max_steps: int) -> dict[str, int]:
    """What the data order and schedule depend on: a resumed run must match it. Samples and their
    random draws follow their global position, so a run may resume on another number of processes
    (or another split into batch × accumulation) as long as the total batch is the same."""
    return {"total_batch": ctx.images_per_step, "max_steps": max_steps}


def _write_checkpoint(ctx: StepContext, run_dir: Path, step: int, optimizer: Any, lr_scheduler: Any, ema: Any, state: dict) -> None:
    accelerator = ctx.accelerator
    if accelerator.is_main_process or ctx.sharding:  # sharded: every process takes part in the gather
        scaler = getattr(accelerator, "scaler", None)
        training_state = {
            "optimizer": sharding.full_optimizer_state(accelerator, ctx.parameters, optimizer, ctx.optimizer_groups),
            "lr_scheduler": lr_scheduler.state_dict(),
            "ema": sharding.full_ema_state(accelerator, ctx.parameters, ema),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": state,
        }
        # the same files as one process writes: sharded tensors gathered whole
        trainable, training_state = sharding.full_parameters(accelerator, ctx.parameters), sharding.gathered(training_state)
    if accelerator.is_main_process:
        save_checkpoint(run_dir, step, trainable, training_state, ctx.config.checkpoints_total_limit)
    ctx.accelerator.wait_for_everyone()


def _progress_bar(total: int, initial: int, enabled: bool, name: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=f"train {name}", unit="step")


def _unwrapped(ctx: StepContext) -> ModelBundle:
    """The bundle without accelerate's (DDP) and torch.compile's wrappers."""

    def unwrap(module: torch.nn.Module) -> torch.nn.Module:
        module = ctx.accelerator.unwrap_model(sharding.unrouted(module))
        return getattr(module, "_orig_mod", module)

    return ctx.bundle.replace(**{name: unwrap(ctx.bundle.components[name]) for name in ctx.bundle.trainable_names()})


def _gathered_bundle(ctx: StepContext, experiment: Experiment) -> ModelBundle:
    """Sharded runs: on rank 0, the bundle with its trained tensors gathered whole into a fresh copy
    of the model, prepared by the technique as in training (so it saves exactly as one process)."""
    full = sharding.full_parameters(ctx.accelerator, ctx.parameters)  # every process takes part
    bundle = _unwrapped(ctx)
    if not ctx.accelerator.is_main_process:
        return bundle
    fresh = bundle.family.load(experiment.model)
    ctx.technique.prepare(fresh)
    restore_parameters(trainable_named_parameters(fresh), full)
    trained = [name for name in fresh.trainable_names() if _trains(fresh.components[name])]
    return bundle.replace(**{name: fresh.components[name] for name in trained})


def _with_original_frozen_parts(ctx: StepContext, bundle: ModelBundle, experiment: Experiment) -> ModelBundle:
    """Frozen parts were cast to the compute dtype for speed; a technique that saves them (``full``
    writes a whole pipeline) gets the base model's own fp32 weights back instead of rounded ones."""
    if ctx.weight_dtype == torch.float32 or not ctx.technique.saves_frozen_parts:
        return bundle
    frozen = [name for name, module in bundle.components.items() if not _trains(module)]
    if not frozen:
        return bundle
    original = bundle.family.load(experiment.model)
    return bundle.replace(**{name: original.components[name] for name in frozen})


def _finish(
    ctx: StepContext,
    experiment: Experiment,
    name: str,
    run_dir: Path,
    status: str,
    state: dict,
    ema: Any,
    timing: dict,
    max_steps: int,
    started: float,
) -> dict[str, Any]:
    """Save the technique's outputs (EMA weights when used) and write the run record."""
    accelerator = ctx.accelerator
    saving_started = time.perf_counter()
    if status == "finished" and ema is not None:
        ema.copy_to(sharding.ema_tensors(accelerator, ctx.parameters))  # the study saves the EMA weights
    bundle = _gathered_bundle(ctx, experiment) if ctx.sharding and status == "finished" else _unwrapped(ctx)
    outputs: dict[str, Any] = {}
    if status == "finished" and accelerator.is_main_process:
        for component in bundle.trainable_names():
            bundle.components[component].eval()
        if ctx.objective.name == "ddpm":  # a prediction_type override must reach the sampler too
            bundle.inference_scheduler.register_to_config(prediction_type=ctx.objective.prediction_type)
        saved = ctx.technique.save(_with_original_frozen_parts(ctx, bundle, experiment), run_dir)
        outputs = {
            part: {"files": files, "bytes": records.bytes_on_disk(run_dir, files)} for part, files in saved.items()
        }
    timing["save_time_s"] = time.perf_counter() - saving_started
    timing["job_wall_time_s"] = time.perf_counter() - started  # from the call to the saved weights
    record = train_record(ctx, experiment, name, bundle, status, state, timing, max_steps, outputs)
    if accelerator.is_main_process:
        records.write_record(run_dir / records.RECORD_FILE, record)
    accelerator.wait_for_everyone()  # no process leaves before the run's files are written
    return record
