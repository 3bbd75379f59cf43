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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtune import cache as cache_lib
from sdtune import diffusion, records
from sdtune.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_resume,
    restore_parameters,
    save_checkpoint,
)
from sdtune.config import ConfigError, Experiment, TrainConfig
from sdtune.data import TrainingSet, augmentation, prepare_training_set, stream_samples
from sdtune.models import Conditioning, ModelBundle, family_for
from sdtune.runs import RunExistsError, StopRequest, claim_run_dir, flat_scalars, train_record
from sdtune.techniques import TECHNIQUES, Technique, trainable_named_parameters

__all__ = ["RunExistsError", "TrainResult", "output_root", "train", "train_technique"]


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
    empty_conditioning: Conditioning | None = None


def train(
    experiment: Experiment,
    techniques: list[str] | None = None,
    output_dir: str | Path | None = None,
    resume: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[TrainResult]:
    """Train the named techniques (default: all of the experiment) one after the other.

    With ``resume``, techniques that already finished are skipped; a checkpoint path needs exactly
    one technique. The returned results do not keep the models (see :func:`train_technique`).
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
        result = train_technique(experiment, name, output_dir, resume, overwrite, progress)
        result.bundle = None  # free the model before the next technique
        results.append(result)
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
    setup_time = time.perf_counter() - started
    stop = StopRequest()
    bar = _progress_bar(max_steps, state["step"], progress and accelerator.is_main_process, name)
    records.reset_peak_memory(accelerator.device)
    models, objective, family = ctx.models, ctx.objective, ctx.bundle.family
    for model in models:
        model.train()
    loop_started, first_step = time.perf_counter(), state["step"]
    status = "finished"
    with stop.installed():
        for step in range(state["step"], max_steps):
            step_started = time.perf_counter()
            step_loss = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                last_micro = micro == cfg.gradient_accumulation_steps - 1
                with _no_sync(accelerator, models, skip=last_micro):  # all-reduce on the last only
                    generator = _step_generator(cfg.seed, accelerator, step, micro)
                    latents, conditioning = _micro_batch(ctx, step, micro, generator)
                    # --- the objective (DDPM or rectified flow), in fp32; the family calls its denoiser ---
                    noise = diffusion.sample_noise(latents, generator, cfg.noise_offset)
                    timesteps = objective.sample_timesteps(latents.shape[0], generator, latents.device)
                    noisy_latents = objective.noisy_latents(latents, noise, timesteps)
                    target = objective.target(latents, noise, timesteps)
                    prediction = family.predict(ctx.bundle, noisy_latents, timesteps, conditioning)
                    loss = diffusion.diffusion_loss(prediction, target, objective.loss_weights(timesteps))
                    accelerator.backward(loss / cfg.gradient_accumulation_steps)
                step_loss += loss.detach().float() / cfg.gradient_accumulation_steps
            accelerator.clip_grad_norm_(list(ctx.parameters.values()), cfg.max_grad_norm)
            lr = lr_scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(ctx.parameters.values())
            done = step + 1
            state["step"] = done
            if after_step is not None:
                after_step(done)
            state["train_time_s"] += time.perf_counter() - step_started
            # one gather per step: the mean loss, and whether any process was asked to stop
            flags = torch.stack([step_loss.reshape(()), torch.tensor(float(stop.requested), device=step_loss.device)])
            gathered = accelerator.gather(flags.reshape(1, 2)).reshape(-1, 2)
            mean_loss, stop_requested = gathered[:, 0].mean().item(), bool(gathered[:, 1].max() > 0)
            _check_finite(mean_loss, done)
            if done % cfg.log_every == 0 or done == max_steps:
                state["loss_history"].append({"step": done, "loss": mean_loss, "lr": lr})
                accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=done)
            images_per_s = ctx.images_per_step * (done - first_step) / (time.perf_counter() - loop_started)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.2f}")
            bar.update(1)
            interrupted = stop_requested and done < max_steps
            periodic = cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < max_steps
            if interrupted or periodic:
                _write_checkpoint(ctx, run_dir, done, optimizer, lr_scheduler, ema, state)
            if interrupted:
                status = "interrupted"
                break
    bar.close()
    accelerator.wait_for_everyone()
    timing = {"setup_time_s": setup_time, "train_time_s": state["train_time_s"], "images_per_step": ctx.images_per_step}
    record = _finish(ctx, experiment, name, run_dir, status, state, ema, timing, max_steps)
    accelerator.end_training()
    bundle = _unwrapped(ctx)
    accelerator.free_memory()
    return TrainResult(run_dir=run_dir, status=status, record=record, bundle=bundle)


def _claim(run_dir: Path, resume: str | bool | None, overwrite: bool) -> Path | None:
    """Claim the run folder on the main process only, then agree on the checkpoint everywhere."""
    from accelerate import PartialState

    state = PartialState()
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
    AcceleratorState._reset_state()  # techniques of one file may differ in mixed precision
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    if accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
        raise ConfigError(
            f"{accelerator.distributed_type.value} is not supported yet: the loop accumulates gradients "
            "itself and prepares models separately; use plain multi-GPU (DDP) with `accelerate launch`"
        )
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    family = family_for(experiment.model)
    bundle = family.load(experiment.model)
    technique = TECHNIQUES.get(spec.kind)(spec.options)
    torch.manual_seed(cfg.seed)  # adapter initialisation is random: same seed, same start
    technique.prepare(bundle)
    trained = [name for name in bundle.trainable_names() if _trains(bundle.components[name])]
    for name, module in bundle.components.items():
        frozen_dtype = torch.float32 if name == "vae" and family.vae_in_fp32 else weight_dtype
        for parameter in module.parameters():  # frozen weights in the compute dtype, trained ones fp32
            parameter.data = parameter.data.to(accelerator.device, torch.float32 if parameter.requires_grad else frozen_dtype)
        module.to(accelerator.device)
    if cfg.gradient_checkpointing:
        bundle.denoiser.enable_gradient_checkpointing()
        for name in trained:
            if name != family.denoiser:
                bundle.components[name].gradient_checkpointing_enable()
    training_set = prepare_training_set(experiment.data, progress=progress and accelerator.is_main_process)
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
        images_per_step=cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes,
    )
    with accelerator.main_process_first():  # one process builds a disk cache, the others read it
        ctx.latent_cache = _latent_cache(ctx, experiment, run_dir.parent, progress)
    prepared = accelerator.prepare(*[bundle.components[name] for name in trained])
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    ctx.bundle = bundle.replace(**dict(zip(trained, prepared)))
    ctx.models = list(prepared)
    ctx.parameters = trainable_named_parameters(_unwrapped(ctx))
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune", config=flat_scalars(dataclasses.asdict(cfg)))
    return ctx


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _latent_cache(
    ctx: StepContext, experiment: Experiment, output_root: Path, progress: bool
) -> cache_lib.LatentCache | None:
    data = experiment.data
    mode = data.cache
    if mode == "off" or (mode == "auto" and not data.center_crop):
        return None
    bundle, family = ctx.bundle, ctx.bundle.family
    cache_texts = not ctx.train_text_encoder
    if mode == "auto":
        text_numel = 0
        if cache_texts:  # from the real shapes (SD3's T5 states dwarf SD1's CLIP states)
            with torch.no_grad():
                text_numel = sum(t[0].numel() for t in family.encode_prompt(bundle, ["probe"]).values())
        variants = 2 if data.random_flip else 1
        latent_side = data.resolution // family.vae_downsampling(bundle)
        latent_numel = family.latent_channels(bundle) * latent_side**2
        estimate = cache_lib.estimate_bytes(len(ctx.training_set), latent_numel, variants, text_numel)
        mode = "memory" if estimate <= data.cache_memory_limit_gb * 1e9 else "disk"
    key = cache_lib.cache_key(
        {
            "model": dataclasses.asdict(experiment.model),
            "data": {k: v for k, v in dataclasses.asdict(data).items() if k not in ("cache", "cache_batch_size")},
            "texts": cache_texts,
            "dtype": str(ctx.weight_dtype),
            "rows": ctx.training_set.indices,
        }
    )
    def encode_images(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return family.encode_images(bundle, pixels.to(ctx.accelerator.device))

    @torch.no_grad()
    def encode_texts(captions: list[str]) -> Conditioning:
        return family.encode_prompt(bundle, captions)

    return cache_lib.build_cache(
        ctx.training_set,
        encode_images,
        encode_texts if cache_texts else None,
        key,
        mode,
        output_root / ".cache",
        progress=progress and ctx.accelerator.is_main_process,
    )


def _optimisation(ctx: StepContext) -> tuple[Any, Any, Any, int]:
    """Optimizer (AdamW), LR schedule (diffusers), optional EMA, and the number of steps."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    cfg, accelerator = ctx.config, ctx.accelerator
    max_steps = cfg.max_train_steps or math.ceil(cfg.num_epochs * len(ctx.training_set) / ctx.images_per_step)
    learning_rate = cfg.learning_rate * (ctx.images_per_step if cfg.scale_lr else 1)
    text_lr = ctx.technique.options.text_encoder_learning_rate or learning_rate
    denoiser = ctx.bundle.family.denoiser + "."
    groups = [
        {"params": [p for n, p in ctx.parameters.items() if n.startswith(denoiser)], "lr": learning_rate},
        {"params": [p for n, p in ctx.parameters.items() if not n.startswith(denoiser)], "lr": text_lr},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:  # the config check made sure bitsandbytes imports
        import bitsandbytes

        optimizer_cls = bitsandbytes.optim.AdamW8bit
    optimizer = optimizer_cls(
        groups,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    optimizer = accelerator.prepare(optimizer)
    # stepped once per optimizer step by the loop itself (not prepared: no per-process scaling)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=max_steps
    )
    ema = None
    if cfg.use_ema:
        ema = EMAModel(list(ctx.parameters.values()), decay=cfg.ema_decay)
        ema.to(accelerator.device)
    return optimizer, lr_scheduler, ema, max_steps


# ----------------------------------------------------------------------------------------------
# One micro-batch


def _step_generator(seed: int, accelerator: Any, step: int, micro: int) -> torch.Generator:
    """A generator seeded from (seed, process, step, micro-step); also seeds torch's global RNG
    (dropout) the same way, so every random draw of a step can be replayed on resume."""
    derived = int(np.random.SeedSequence([seed, accelerator.process_index, step, micro]).generate_state(1)[0])
    torch.manual_seed(derived)
    return torch.Generator(device=accelerator.device).manual_seed(derived)


def _micro_batch(
    ctx: StepContext, step: int, micro: int, generator: torch.Generator
) -> tuple[torch.Tensor, Conditioning]:
    """Latents and conditioning of this process's share of a micro-step (deterministic)."""
    cfg, accelerator, data = ctx.config, ctx.accelerator, ctx.training_set.config
    global_micro = step * cfg.gradient_accumulation_steps + micro
    start = (global_micro * accelerator.num_processes + accelerator.process_index) * cfg.batch_size
    indices, epochs = stream_samples(cfg.seed, len(ctx.training_set), start, cfg.batch_size)
    flips, crops, dropped = [], [], []
    for index, epoch in zip(indices.tolist(), epochs.tolist()):
        choice = augmentation(cfg.seed, epoch, index)
        flips.append(choice.flip and data.random_flip)
        crops.append(None if data.center_crop else choice.crop)
        dropped.append(choice.caption_draw < cfg.caption_dropout)
    device = accelerator.device
    bundle, family = ctx.bundle, ctx.bundle.family
    if ctx.latent_cache is not None:
        mean, std = ctx.latent_cache.posterior(indices.tolist(), flips)
    else:
        pixels = torch.stack([ctx.training_set.pixels(i, f, c) for i, f, c in zip(indices, flips, crops)])
        mean, std = family.encode_images(bundle, pixels.to(device))
    latents = diffusion.sample_latents(
        mean.to(device).float(), std.to(device).float(), ctx.latent_scale, generator, ctx.latent_shift
    )
    if ctx.latent_cache is not None and ctx.latent_cache.has_texts:
        conditioning = {k: v.to(device, ctx.weight_dtype) for k, v in ctx.latent_cache.text(indices.tolist()).items()}
        if any(dropped):
            rows = torch.tensor(dropped, device=device)
            for name, empty in _empty_conditioning(ctx).items():
                conditioning[name][rows] = empty.to(conditioning[name].dtype)
    else:
        captions = ["" if drop else ctx.training_set.captions[i] for i, drop in zip(indices, dropped)]
        with contextlib.nullcontext() if ctx.train_text_encoder else torch.no_grad():
            conditioning = family.encode_prompt(bundle, captions)
    geometry = [ctx.training_set.geometry(i, f, c) for i, f, c in zip(indices, flips, crops)]
    geometry_tensor = torch.tensor(geometry, device=device, dtype=ctx.weight_dtype)
    conditioning.update(family.image_conditioning(geometry_tensor))
    return latents, conditioning  # fp32 latents: the noising maths stays exact; autocast feeds the denoiser


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
    if skip or accelerator.num_processes == 1:
        yield
        return
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
        yield


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
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
            f"cannot resume {checkpoint}: {changed}; resume with the batch size, accumulation, number of "
            "processes and steps it was started with (the data order depends on them)"
        )
    restore_parameters(ctx.parameters, trainable)
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(saved["ema"])
        ema.to(ctx.accelerator.device)
    scaler = getattr(ctx.accelerator, "scaler", None)
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    state = dict(saved["state"])
    state["resumed_from"] = [*state.get("resumed_from", []), str(checkpoint)]
    print(f"resumed from {checkpoint} at step {state['step']}")
    return state


def _layout(ctx: StepContext, max_steps: int) -> dict[str, int]:
    """What the data order and schedule depend on: a resumed run must match it."""
    cfg = ctx.config
    return {
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_processes": ctx.accelerator.num_processes,
        "max_steps": max_steps,
    }


def _write_checkpoint(ctx: StepContext, run_dir: Path, step: int, optimizer: Any, lr_scheduler: Any, ema: Any, state: dict) -> None:
    if ctx.accelerator.is_main_process:
        scaler = getattr(ctx.accelerator, "scaler", None)
        training_state = {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": state,
        }
        save_checkpoint(run_dir, step, ctx.parameters, training_state, ctx.config.checkpoints_total_limit)
    ctx.accelerator.wait_for_everyone()


def _progress_bar(total: int, initial: int, enabled: bool, name: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=f"train {name}", unit="step")


def _unwrapped(ctx: StepContext) -> ModelBundle:
    unwrap = ctx.accelerator.unwrap_model
    return ctx.bundle.replace(**{name: unwrap(ctx.bundle.components[name]) for name in ctx.bundle.trainable_names()})


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
) -> dict[str, Any]:
    """Save the technique's outputs (EMA weights when used) and write the run record."""
    accelerator = ctx.accelerator
    bundle = _unwrapped(ctx)
    outputs: dict[str, Any] = {}
    if status == "finished" and accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(ctx.parameters.values())  # the study saved the EMA weights
        for component in bundle.trainable_names():
            bundle.components[component].eval()
        if ctx.objective.name == "ddpm":  # a prediction_type override must reach the sampler too
            bundle.inference_scheduler.register_to_config(prediction_type=ctx.objective.prediction_type)
        saved = ctx.technique.save(_with_original_frozen_parts(ctx, bundle, experiment), run_dir)
        outputs = {
            part: {"files": files, "bytes": records.bytes_on_disk(run_dir, files)} for part, files in saved.items()
        }
    record = train_record(ctx, experiment, name, bundle, status, state, timing, max_steps, outputs)
    if accelerator.is_main_process:
        records.write_json_atomic(run_dir / records.RECORD_FILE, record)
    return record
