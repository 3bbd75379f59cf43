"""Setting up one technique's run: :func:`setup_run` returns a :class:`TrainingRun`, built whole.

The accelerator (mixed precision, gradient accumulation, FSDP2/DeepSpeed when launched with them),
the base model with the technique applied (frozen weights in the compute dtype, trained ones in fp32),
DreamBooth's class images, the training set and its data order, the latent cache, the optimizer, LR
schedule and EMA, the accelerate-prepared modules and the input pipeline: everything the loop reads.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from sdtune import diffusion
from sdtune.config import ConfigError, TrainConfig
from sdtune.data.batches import Layout
from sdtune.data.dataset import TrainingSet, prepare_training_set
from sdtune.experiment import Experiment
from sdtune.models import Model
from sdtune.preflight import check_device_options
from sdtune.techniques import Technique, trainable_named_parameters
from sdtune.training import blockswap, optim, savers, sharding
from sdtune.training import prior as prior_lib
from sdtune.training.ema import LerpEMA
from sdtune.training.fingerprint import RunFingerprint
from sdtune.training.inputs import InputPipeline, open_latent_cache
from sdtune.training.state import TrainState
from sdtune.training.trained_check import digests, new_evidence
from sdtune.util.device import on_cpu, synchronize

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # else fp32


@dataclass(frozen=True)
class TrainingRun:
    """Everything the training loop of one technique reads (its mutable state is a :class:`TrainState`)."""

    experiment: Experiment
    name: str  # the technique's name in the experiment
    run_dir: Path
    config: TrainConfig  # this technique's train settings
    technique: Technique
    accelerator: Accelerator
    model: Model  # as the loop calls it: the trained components prepared by accelerate
    models: tuple[torch.nn.Module, ...]  # the prepared trained modules (train mode, gradient sync)
    parameters: dict[str, torch.nn.Parameter]  # the trained tensors, named <component>.<parameter>
    optimizer_groups: tuple[tuple[str, ...], ...]  # the trained names in each optimizer param group
    optimizer: Any
    lr_scheduler: Any
    ema: LerpEMA | None
    max_steps: int
    objective: diffusion.DDPMObjective | diffusion.FlowMatchingObjective
    weight_dtype: torch.dtype  # frozen weights and cached conditioning
    input_dtype: torch.dtype  # the denoiser's inputs (DeepSpeed bf16: bf16; else fp32, autocast casts)
    sharding: str | None  # fsdp2 | deepspeed: trained tensors are sharded (see sdtune.training.sharding)
    train_text_encoder: bool  # a text encoder trains: conditioning is encoded every step, with gradients
    images_per_step: int  # batch × accumulation × processes
    layout: Layout  # what each micro-batch holds (pure in its position)
    block_swap: blockswap.BlockSwap | None  # train.block_swap: the swapped transformer blocks
    training_set: TrainingSet
    inputs: InputPipeline
    timing: Mapping[str, float]  # setup split: model load, class images, data, cache
    start_digests: Mapping[str, Any]  # this session's digests of the trainable and frozen tensors (trained_check)

    def start_trackers(self) -> None:
        """Open the run's TensorBoard log (after a resume was accepted: a refused one writes nothing)."""
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers("sdtune", config=flat_scalars(dataclasses.asdict(self.config)))

    def unwrapped_model(self) -> Model:
        """The model without accelerate's (DDP, FSDP2 container) and torch.compile's wrappers."""
        return unwrapped(self.model, self.accelerator)

    def new_state(self) -> TrainState:
        """The state of a run that starts at step 0 (its fingerprint: what a resume must match)."""
        return TrainState(fingerprint=self.fingerprint().flat(), trained_evidence=new_evidence(dict(self.start_digests)))

    def fingerprint(self) -> RunFingerprint:
        """The settings that shape this run (:mod:`sdtune.training.fingerprint`). Samples and their
        random draws follow their global position, so a run may resume on another number of
        processes (or another split into batch × accumulation) as long as the total batch is the same."""
        return RunFingerprint.of_run(
            self.experiment, self.name, self.training_set, self.max_steps, self.images_per_step,
            self.accelerator.num_processes, self.sharding,
        )


def unwrapped(model: Model, accelerator: Accelerator) -> Model:
    def unwrap(module: torch.nn.Module) -> torch.nn.Module:
        module = accelerator.unwrap_model(sharding.unrouted(module))
        return getattr(module, "_orig_mod", module)

    return model.replace(**{name: unwrap(model.components[name]) for name in model.trainable_names()})


def trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def setup_run(experiment: Experiment, name: str, run_dir: Path, progress: bool) -> TrainingRun:
    """Build the run of technique ``name`` (see the module docstring)."""
    config, item = experiment.train_config_for(name), experiment.techniques[name]
    accelerator = _accelerator(config, run_dir)
    savers.check_device(config, experiment.evaluation, accelerator.device)
    if config.fused_backward and accelerator.num_processes > 1:
        raise ConfigError(
            "train.fused_backward: each tensor steps before the processes average its gradient; train on one process"
        )
    sharded = sharding.configure(accelerator, config)  # FSDP2 / DeepSpeed when launched with them
    evaluates = experiment.evaluation.every_steps is not None or experiment.validation is not None
    sharding.check_evaluation_during_training(accelerator, sharded, config.use_ema, evaluates)
    weight_dtype = WEIGHT_DTYPES.get(config.mixed_precision, torch.float32)
    timing, started = {}, time.perf_counter()
    model = experiment.family.load(experiment.model)
    # DreamBooth: the class images come from the base model, before the technique changes it
    prior = prior_lib.setup(experiment, config, model, run_dir.parent, accelerator, progress, timing)
    started += timing.get("class_images_time_s", 0.0)  # (not model loading)
    technique = item.build()
    torch.manual_seed(config.seed)  # adapter initialisation is random: same seed, same start
    technique.prepare(model)
    trained = [component for component in model.trainable_names() if trains(model.components[component])]
    swap = blockswap.attach(  # before placing: the swapped blocks' frozen weights never go to the device whole
        model.denoiser, model.swappable_blocks, config.block_swap, model.family, accelerator.device,
        savers.parking_device(), weight_dtype,
    )
    _place(model, accelerator.device, weight_dtype, config, trained, swap.parameter_ids if swap else set())
    synchronize(accelerator.device)
    timing["model_load_time_s"], started = time.perf_counter() - started, time.perf_counter()
    # the trained-what-it-claims check's starting point, before sharding splits tensors across processes
    start = digests(model, technique, [c for c in model.components if c not in trained] if sharded else None)
    timing["check_digest_time_s"], started = time.perf_counter() - started, time.perf_counter()
    training_set = prepare_training_set(
        experiment.data, progress and accelerator.is_main_process, model.pixel_stride, held_out=experiment.validation
    )
    technique.check_captions(training_set.captions)
    training_set.transform_captions(technique.transform_caption)  # after shuffling too (TrainingSet.caption)
    images_per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    timing["data_setup_time_s"], started = time.perf_counter() - started, time.perf_counter()
    layout = Layout(
        seed=config.seed, num_samples=training_set.num_slots, batch_size=config.batch_size,
        accumulation=config.gradient_accumulation_steps, num_processes=accelerator.num_processes,
        process_index=accelerator.process_index, random_flip=experiment.data.random_flip,
        center_crop=experiment.data.center_crop, caption_dropout=config.caption_dropout,
        order=training_set.bucket_order(config.seed, images_per_step), slot_images=training_set.slot_images(),
    )
    train_text_encoder = any(component != model.denoiser_name for component in trained)
    cache = open_latent_cache(experiment, model, training_set, weight_dtype, train_text_encoder, run_dir.parent)
    timing["cache_open_time_s"] = time.perf_counter() - started
    if config.compile:
        model.components[model.denoiser_name] = torch.compile(model.denoiser)

    # the optimizer, then the trained modules and the optimizer prepared together (FSDP2 replaces the
    # parameters the optimizer holds)
    max_steps = config.max_train_steps or layout.steps_for_epochs(config.num_epochs)
    learning_rate = config.learning_rate * (images_per_step if config.scale_lr else 1)
    parameters = trainable_named_parameters(unwrapped(model, accelerator))
    parameter_groups = optim.parameter_groups(technique, parameters, model.denoiser_name, learning_rate)
    names = {id(parameter): parameter_name for parameter_name, parameter in parameters.items()}
    groups = tuple(tuple(names[id(parameter)] for parameter in group["params"]) for group in parameter_groups)
    optimizer = optim.build_optimizer(parameter_groups, config, accelerator.device)
    called, models, optimizer = sharding.prepare(
        accelerator, {c: model.components[c] for c in trained}, optimizer, sharded, device_placement=swap is None
    )
    model = model.replace(**called)
    parameters = trainable_named_parameters(unwrapped(model, accelerator))
    lr_scheduler = optim.build_lr_schedule(optimizer, config, max_steps)
    ema = optim.build_ema(sharding.ema_tensors(accelerator, parameters), config, accelerator.device)
    inputs = InputPipeline(
        model, training_set, layout, cache, prior, accelerator.device, weight_dtype, train_text_encoder, config.seed,
        accelerator.process_index, parking=savers.parking_device() if config.free_encoders else None,
    )
    return TrainingRun(
        experiment=experiment, name=name, run_dir=run_dir, config=config, technique=technique, accelerator=accelerator,
        model=model, models=tuple(models), parameters=parameters, optimizer_groups=groups, optimizer=optimizer,
        lr_scheduler=lr_scheduler, ema=ema, max_steps=max_steps,
        objective=diffusion.build_objective(model.objective, model.noise_schedule(), item.objective),
        weight_dtype=weight_dtype, input_dtype=sharding.input_dtype(accelerator, weight_dtype), sharding=sharded,
        train_text_encoder=train_text_encoder, images_per_step=images_per_step, layout=layout, block_swap=swap,
        training_set=training_set, inputs=inputs, timing=dict(timing), start_digests=start,
    )


def _accelerator(config: TrainConfig, run_dir: Path) -> Accelerator:
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    check_device_options(config)  # (checked before the run folder was claimed; again for direct callers)
    gc.collect()  # the previous technique's model, if the caller dropped it
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # in-process use only (the CLI and compare train each technique in a fresh process): techniques
    # of one file may differ in mixed precision, which accelerate's singleton state would refuse
    AcceleratorState._reset_state()
    sharding.before_accelerator()
    accelerator = Accelerator(
        cpu=on_cpu(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,  # accumulate(): sync on the last micro-step
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    sharding.load_whole(accelerator)  # (ZeRO-3: no partitioned loading; the engine partitions what trains)
    if torch.cuda.is_available():  # set either way: a flag left on by an earlier run must not leak in
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32
    return accelerator


def _place(
    model: Model, device: torch.device, weight_dtype: torch.dtype, config: TrainConfig, trained: list[str], swapped: set[int]
) -> None:
    """Frozen weights in the compute dtype (the VAE in fp32 where the family says so), trained ones in
    fp32, all on the device but the ``swapped`` ones (block swap keeps them); memory-format and
    gradient-checkpointing options."""
    for component, module in model.components.items():
        frozen_dtype = torch.float32 if component == "vae" and model.vae_in_fp32 else weight_dtype
        for parameter in module.parameters():
            if id(parameter) not in swapped:
                parameter.data = parameter.data.to(device, torch.float32 if parameter.requires_grad else frozen_dtype)
        for name, buffer in list(module.named_buffers()):  # (not module.to: it would move the swapped weights too)
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, buffer.to(device))
    if config.channels_last:
        model.denoiser.to(memory_format=torch.channels_last)
    if config.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
        for component in trained:
            if component != model.denoiser_name:
                model.components[component].gradient_checkpointing_enable()


def flat_scalars(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as flat ``a.b`` keys of plain scalars (TensorBoard's hyperparameters)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
