"""``sdtune train EXP --estimate [--budget 24GB]``: the peak memory of training each technique,
estimated before any weight is read, with its breakdown and the savers that bring it under a budget.

How each term is counted (docs/memory.md, "The estimate"):

- **weights**: every component built from its config on the meta device (:mod:`sdtune.models.empty`),
  the technique applied, each tensor at the dtype the run places it in (trained: fp32; frozen: the
  mixed-precision dtype; the VAE in fp32 where the family says so), quantised where the experiment
  quantises it for the technique (:func:`quantized_weight_bytes`); parked encoders and swapped blocks are left out;
- **gradients** (fp32, one per trained value), **optimizer states** (per ``train.optimizer``) and the
  **EMA** (fp32): counted from the trained tensors' sizes;
- **activations** and the **forward + backward peak**: measured, not modelled: one micro-step of the
  run's own loss (:func:`sdtune.training.step.denoising_loss`) at the batch size and resolution, on
  the meta device, under :class:`sdtune.util.memtrack.LiveBytes`, which counts every tensor the
  operators create and free, in order (activations saved for backward, each operator's
  temporaries). This is why it runs the denoiser rather than a per-layer formula: one measurement
  covers every family, technique and checkpointing choice without a table to keep in step with
  diffusers. Autocast does not act on the meta device, so under mixed precision the measured pass
  runs every tensor in the compute dtype (what autocast gives matmuls and convolutions; its fp32
  norms and softmaxes are counted at half size) and the bf16/fp16 copies autocast makes of fp32
  trained weights are added (2 bytes a value);
- the **gradients**: without accumulation they are kept in the measured pass, each from the moment
  backward makes it (so the peak is counted where it really falls, activations half freed and
  gradients half made); when micro-steps accumulate they are held through the whole next micro-step,
  so they are added to the pass's peak whole; with ``fused_backward`` or a gradient-freeing offload
  each lives in the pass from when backward makes it until its hook frees it. (Under mixed precision
  the pass holds them in the compute dtype; the rest of their fp32 size is added.)

The total is weights + optimizer states + EMA + the forward + backward peak; on a CPU (``device=
"cpu"``: the figure the record's peak RSS measures) also **the process itself** (the interpreter and
the libraries a training process loads, measured in this process) and **malloc's kept free blocks**:
the heap of glibc's malloc outgrows the live tensors of a step, because small long-lived allocations
land inside the holes that freed activations leave and pin them (measured: docs/memory.md, "Where a
CPU run's memory goes"); with jemalloc it does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import re
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtune import diffusion
from sdtune.config import ConfigError, QuantizeConfig, TrainConfig
from sdtune.experiment import Experiment
from sdtune.models import Model
from sdtune.models.empty import load_empty
from sdtune.techniques import trainable_named_parameters
from sdtune.training.step import denoising_loss
from sdtune.util.allocator import malloc_in_use
from sdtune.util.memtrack import LiveBytes, fused_attention

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# bitsandbytes' optimizers keep 8-bit moments only for tensors of at least 4096 values (min_8bit_size),
# with one fp32 absmax per block of 256 values per moment; smaller tensors keep fp32 moments
EIGHT_BIT_MIN_SIZE, EIGHT_BIT_BLOCK = 4096, 256
# frozen Linear weights quantised by model.quantize (bitsandbytes): nf4 = 4 bits + one fp32 absmax per
# 64 values; int8 (LLM.int8) = 1 byte + one fp32 scale per row (≈ 0 here)
QUANTIZED_BYTES_PER_WEIGHT = {"nf4": 0.5 + 4 / 64, "int8": 1.0}
GIB = 2**30
# The bytes a CPU process's malloc holds beyond a training step's live tensors, as a share of the bytes the
# step allocates over its course (bytes / bytes). glibc: blocks freed during a step are not all reused (the
# free space ends up split among small live allocations), so part of each step's allocations land on the
# heap's top, until the heap stops growing after the second step. It follows the bytes allocated loosely, and
# the step's peak no better (over the six runs below its share of the allocations spans 4x, of the peak 5x:
# gradient checkpointing lowers the peak 2-3x but allocates more). Measured (peak RSS − every other term) / step_allocated, 2 steps of a 71 M-parameter UNet, batch 2,
# sdtune's kept malloc: full 0.19 / 0.13 / 0.05 and LoRA 0.20 / 0.22 / 0.11 at 128 px / 256 px / 256 px with
# gradient checkpointing; 0.13, the middle of that 0.05-0.22 range, puts all six within ±19 % of their peak
# RSS (table and method: docs/memory.md, "Where a CPU run's memory goes"). jemalloc keeps none to speak of:
# the estimate without this term was +1.3 % of a LoRA 256 px run's peak RSS under LD_PRELOAD=libjemalloc.
HEAP_KEPT_FRACTION = {"glibc": 0.13, "jemalloc": 0.0}


@dataclass(frozen=True)
class MemoryEstimate:
    """One technique's estimated peak memory (bytes) and what it is made of."""

    technique: str
    kind: str
    device: str  # what the total describes: "cuda" (GPU memory) or "cpu" (the process's memory)
    batch_size: int
    resolution: int
    mixed_precision: str
    weights: dict[str, int]  # component → bytes on the device
    weights_elsewhere: int  # bytes waiting on the CPU (parked encoders, swapped blocks)
    trainable_parameters: int  # values
    gradients: int
    optimizer_states: int
    ema: int
    activations: int  # saved for backward at the end of the forward
    activations_other: int  # the same with gradient checkpointing the other way round
    step_peak: int  # forward + backward: activations and temporaries at their peak, + gradients
    step_allocated: int  # bytes the forward + backward allocates over its course (freed ones too)
    process: int  # the process itself: the interpreter and its libraries (CPU only)
    heap_kept: int  # free blocks malloc keeps between live ones at the step's peak (CPU only)
    malloc: str  # the malloc that serves the process (CPU only; "" for a GPU)
    savers: dict[str, Any]  # the run's savers
    fits_with: list[str] | None = None  # --budget: the savers that bring it under, in order ([] = as is)
    fitted_total: int | None = None  # the total with those savers
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (sum(self.weights.values()) + self.optimizer_states + self.ema + self.step_peak + self.process
                + self.heap_kept)

    def describe(self) -> str:
        """The breakdown as ``sdtune train --estimate`` prints it."""
        return format_estimate(self)


def estimate_memory(
    experiment: Experiment, techniques: list[str] | None = None, budget: str | int | None = None, device: str = "cuda"
) -> list[MemoryEstimate]:
    """The peak-memory estimate of each technique (default: all) for training on ``device`` ("cuda":
    GPU memory; "cpu": the process's resident memory); with ``budget`` ("24GB", or bytes) the savers
    that bring each under it. No weight is read (see the module docstring)."""
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"--estimate-device: {device!r} is not allowed; expected cuda or cpu")
    limit = parse_bytes(budget) if budget is not None else None
    results = []
    for name in techniques or list(experiment.techniques):
        if name not in experiment.techniques:
            raise ConfigError(f"--technique {name!r} is not in the experiment; it has: {', '.join(experiment.techniques)}")
        estimator = _Estimator(experiment, name, device)
        estimate = estimator.estimate(experiment.train_config_for(name))
        if limit is not None:
            estimate = estimator.fit(estimate, limit)
        results.append(estimate)
    return results


def parse_bytes(text: str | int) -> int:
    """"24GB", "24 GiB", "12G", "8000MB" → bytes. A card's "24 GB" is 24 GiB, so GB and GiB both
    mean 2³⁰ bytes here (MB: 2²⁰)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GgMmTt])(?:i?[Bb])?\s*", str(text))
    if not match:
        raise ConfigError(f"--budget: {text!r} is not a size; write it like 24GB, 12GiB or 8000MB")
    return int(float(match.group(1)) * 2 ** {"m": 20, "g": 30, "t": 40}[match.group(2).lower()])


def quantized_weight_bytes(
    setting: QuantizeConfig, component: str, module: torch.nn.Module, model: Model, config: TrainConfig
) -> int | None:
    """The bytes of a component quantised by the technique's ``quantize`` (``model.quantize`` with its
    override: ``{denoiser: nf4|int8, text_encoders: int8|nf4}``), or None where it is not: its frozen
    Linear weights at the quantised size, the rest at the dtype the run places it in."""
    kind = (
        setting.denoiser if component == model.denoiser_name
        else setting.text_encoders if component in model.text_encoder_names else None
    )
    if kind not in QUANTIZED_BYTES_PER_WEIGHT:
        return None
    total = 0
    for submodule in module.modules():
        for name, parameter in submodule.named_parameters(recurse=False):
            frozen_linear = isinstance(submodule, torch.nn.Linear) and name == "weight" and not parameter.requires_grad
            per_value = (
                QUANTIZED_BYTES_PER_WEIGHT[kind] if frozen_linear
                else _placed_dtype(parameter, component, model, config).itemsize
            )
            total += int(parameter.numel() * per_value)
    return total


class _Estimator:
    """One technique's empty model, measured once per (checkpointing, gradients freed) variant."""

    def __init__(self, experiment: Experiment, name: str, device: str) -> None:
        self.experiment, self.name, self.device = experiment, name, device
        self.item = experiment.techniques[name]
        self.model = load_empty(experiment.family, experiment.model)
        torch.manual_seed(0)
        self.item.build().prepare(self.model)
        self.trained = trainable_named_parameters(self.model)
        self.train_text_encoder = any(not n.startswith(self.model.denoiser_name + ".") for n in self.trained)
        self._steps: dict[tuple, tuple[int, int, int]] = {}

    # -- the terms -------------------------------------------------------------------------------
    def estimate(self, config: TrainConfig) -> MemoryEstimate:
        weights, elsewhere = self._weights(config)
        numel = sum(p.numel() for p in self.trained.values())
        frees_gradients = config.fused_backward or (config.optimizer_offload and config.gradient_accumulation_steps == 1)
        accumulates = config.gradient_accumulation_steps > 1 and not frees_gradients
        kept = not frees_gradients and not accumulates  # the pass keeps each gradient from when it is made
        activations, peak, allocated = self._step(config, config.gradient_checkpointing, kept)
        other, _, _ = self._step(config, not config.gradient_checkpointing, kept)
        largest = max((p.numel() for p in self.trained.values()), default=0)
        compute_size = WEIGHT_DTYPES.get(config.mixed_precision, torch.float32).itemsize
        # the pass holds gradients in the compute dtype; the run's are fp32: the rest of their size is added
        if frees_gradients:  # each one lives in the pass from when it is made until its hook frees it
            peak += (4 - compute_size) * largest
        elif accumulates:  # the previous micro-steps' gradients, held through this one
            peak += 4 * numel
        else:
            peak += (4 - compute_size) * numel
        if config.mixed_precision != "no":  # autocast's low-precision copies of the fp32 trained weights
            peak += 2 * numel
        process, malloc, heap_kept, notes = 0, "", 0, []
        if self.device == "cpu":
            malloc, process = malloc_in_use(), _process_bytes()
            if malloc not in HEAP_KEPT_FRACTION:
                notes.append(f"malloc's kept free blocks are glibc's measured share: {malloc}'s was not measured")
            heap_kept = int(HEAP_KEPT_FRACTION.get(malloc, HEAP_KEPT_FRACTION["glibc"]) * allocated)
        return MemoryEstimate(
            technique=self.name, kind=self.item.kind, device=self.device, batch_size=config.batch_size,
            resolution=self.experiment.data.resolution, mixed_precision=config.mixed_precision, weights=weights,
            weights_elsewhere=elsewhere, trainable_parameters=numel, gradients=4 * numel,
            optimizer_states=self._optimizer_states(config), ema=4 * numel if config.use_ema else 0,
            activations=activations, activations_other=other, step_peak=peak, step_allocated=allocated,
            process=process, heap_kept=heap_kept,
            malloc=malloc, savers=_savers(config), notes=notes,
        )

    def _weights(self, config: TrainConfig) -> tuple[dict[str, int], int]:
        model, weights, elsewhere = self.model, {}, 0
        parked = self._parked(config)
        for component, module in model.components.items():
            size = quantized_weight_bytes(self.item.model.quantize, component, module, model, config)
            if size is None:
                size = sum(p.numel() * _placed_dtype(p, component, model, config).itemsize for p in module.parameters())
            if component in parked:
                elsewhere += size
            else:
                weights[component] = size
        if config.block_swap:
            blocks = list(getattr(model.denoiser, model.swappable_blocks or "", []))[-config.block_swap:]
            frozen = [sum(p.numel() * _placed_dtype(p, model.denoiser_name, model, config).itemsize
                          for p in block.parameters() if not p.requires_grad) for block in blocks]
            swapped = sum(frozen) - max(frozen, default=0)  # (one swapped block is in at a time)
            weights[model.denoiser_name] -= swapped
            elsewhere += swapped
        return weights, elsewhere

    def _parked(self, config: TrainConfig) -> set[str]:
        """``free_encoders``: the VAE, and the frozen text encoders when captions are cached."""
        if not config.free_encoders:
            return set()
        data = self.experiment.data
        captions_cached = not self.train_text_encoder and not data.shuffle_captions
        return {"vae", *(self.model.loaded_text_encoders if captions_cached else [])}

    def _optimizer_states(self, config: TrainConfig) -> int:
        """Two moments per trained value: fp32, or 8-bit codes + block scales; none on the GPU when
        offloaded (torchao keeps tensors under 4096 values on the GPU: counted)."""
        total = 0
        for parameter in self.trained.values():
            numel = parameter.numel()
            if config.optimizer_offload and numel >= 4096:
                continue
            if config.optimizer.endswith("8bit") and numel >= EIGHT_BIT_MIN_SIZE:
                total += 2 * (numel + 4 * -(-numel // EIGHT_BIT_BLOCK))
            else:
                total += 8 * numel
        return total

    # -- the measured step -----------------------------------------------------------------------
    def _step(self, config: TrainConfig, checkpointing: bool, keep_gradients: bool) -> tuple[int, int, int]:
        """(bytes saved for backward at the end of the forward, peak of forward + backward, bytes it
        allocates in all), measured on the meta device; each gradient is kept from when backward
        makes it (``keep_gradients``) or dropped at once (the caller adds what the run holds of them)."""
        key = (checkpointing, config.batch_size, config.mixed_precision, keep_gradients)
        if key not in self._steps:
            self._steps[key] = self._measure(config, checkpointing, keep_gradients)
        return self._steps[key]

    def _measure(self, config: TrainConfig, checkpointing: bool, keep_gradients: bool) -> tuple[int, int, int]:
        model, dtype = self.model, WEIGHT_DTYPES.get(config.mixed_precision, torch.float32)
        for module in model.components.values():  # (the compute dtype throughout: see the module docstring)
            for parameter in module.parameters():
                parameter.data = parameter.data.to(torch.float32 if module is model.vae and model.vae_in_fp32 else dtype)
        _set_checkpointing(model, checkpointing, self.train_text_encoder)
        hooks = [] if keep_gradients else [p.register_post_accumulate_grad_hook(_drop_gradient) for p in self.trained.values()]
        objective = diffusion.build_objective(model.objective, model.noise_schedule(), self.item.objective)
        batch = config.batch_size * (2 if config.prior_preservation else 1)
        side = self.experiment.data.resolution // model.vae_downsampling
        tracker = LiveBytes()
        try:
            with fused_attention(), tracker:
                latents = torch.zeros(batch, model.latent_channels, side, side, device="meta", dtype=dtype)
                loss = self._loss(model, objective, latents, dtype)
                saved = tracker.live
                loss.backward()
                del loss, latents
        finally:
            for hook in hooks:
                hook.remove()
            for parameter in self.trained.values():
                parameter.grad = None  # (the next measured pass starts without gradients)
        return saved, tracker.peak, tracker.allocated

    def _loss(self, model: Model, objective: Any, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        captions = ["a photo"] * latents.shape[0]
        with torch.enable_grad() if self.train_text_encoder else torch.no_grad():
            conditioning = model.encode_prompt(captions)
        side = latents.shape[-1] * model.vae_downsampling
        geometry = torch.tensor([[side, side, 0, 0, side, side]] * latents.shape[0], dtype=dtype, device="meta")
        conditioning.update(model.image_conditioning(geometry))
        integer = model.objective == "ddpm"
        timesteps = torch.full((latents.shape[0],), 500, device="meta", dtype=torch.long if integer else torch.float32)
        return denoising_loss(model, objective, latents, torch.zeros_like(latents), timesteps, conditioning, input_dtype=dtype)

    # -- the budget -------------------------------------------------------------------------------
    def fit(self, estimate: MemoryEstimate, limit: int) -> MemoryEstimate:
        """The savers, cheapest first, added one by one until the total is under ``limit``."""
        config = self.experiment.train_config_for(self.name)
        if estimate.total <= limit:
            return dataclasses.replace(estimate, fits_with=[], fitted_total=estimate.total)
        chosen, current = [], estimate
        for label, change in self._candidates(config):
            config = dataclasses.replace(config, **change)
            chosen.append(label)
            current = self.estimate(config)
            if current.total <= limit:
                return dataclasses.replace(estimate, fits_with=chosen, fitted_total=current.total)
        swap = self._blocks_to_fit(config, current, limit)
        if swap is not None:
            config = dataclasses.replace(config, block_swap=swap)
            current = self.estimate(config)
            return dataclasses.replace(estimate, fits_with=[*chosen, f"block_swap: {swap}"], fitted_total=current.total)
        note = f"does not fit in {limit / GIB:.1f} GiB even with {', '.join(chosen) or 'every saver'} ({current.total / GIB:.1f} GiB)"
        return dataclasses.replace(estimate, fits_with=None, fitted_total=current.total, notes=[*estimate.notes, note])

    def _candidates(self, config: TrainConfig) -> list[tuple[str, dict[str, Any]]]:
        """The savers this run could still use, cheapest first (CUDA-only ones only for a GPU)."""
        gpu, data = self.device == "cuda", self.experiment.data
        options = [
            (not config.gradient_checkpointing, "gradient_checkpointing: true", {"gradient_checkpointing": True}),
            (config.optimizer == "adamw", "optimizer: adamw8bit", {"optimizer": "adamw8bit"}),
            (gpu and not config.free_encoders and data.center_crop and data.cache != "off", "free_encoders: true",
             {"free_encoders": True}),
            (not config.fused_backward and not config.optimizer_offload and config.gradient_accumulation_steps == 1
             and config.mixed_precision != "fp16", "fused_backward: true (with max_grad_norm: null)",
             {"fused_backward": True, "max_grad_norm": None}),
            (gpu and not config.optimizer_offload and not config.fused_backward, "optimizer_offload: true",
             {"optimizer_offload": True}),
        ]
        return [(label, change) for wanted, label, change in options if wanted]

    def _blocks_to_fit(self, config: TrainConfig, current: MemoryEstimate, limit: int) -> int | None:
        """The fewest swapped blocks that bring ``current`` under ``limit`` (GPU, transformer families)."""
        if self.device != "cuda" or not self.model.swappable_blocks:
            return None
        count = len(getattr(self.model.denoiser, self.model.swappable_blocks))
        for blocks in range(config.block_swap + 1, count):
            weights, _ = self._weights(dataclasses.replace(config, block_swap=blocks))
            if current.total - sum(current.weights.values()) + sum(weights.values()) <= limit:
                return blocks
        return None


def _placed_dtype(parameter: torch.nn.Parameter, component: str, model: Model, config: TrainConfig) -> torch.dtype:
    """The dtype the run places a tensor in (training/setup.py ``_place``)."""
    if parameter.requires_grad:
        return torch.float32
    if component == "vae" and model.vae_in_fp32:
        return torch.float32
    return WEIGHT_DTYPES.get(config.mixed_precision, torch.float32)


# what a training process imports that the estimate itself does not: the data loaders' 🤗 datasets (the CLI
# imports it in every command) and accelerate's tensorboard tracker (training/setup.py, log_with)
TRAINING_PROCESS_LIBRARIES = ("datasets", "torch.utils.tensorboard")


def _set_checkpointing(model: Model, enabled: bool, train_text_encoder: bool) -> None:
    if enabled:
        model.denoiser.enable_gradient_checkpointing()
    else:
        model.denoiser.disable_gradient_checkpointing()
    for name in model.loaded_text_encoders if train_text_encoder else []:
        encoder = model.components[name]
        encoder.gradient_checkpointing_enable() if enabled else encoder.gradient_checkpointing_disable()


def _drop_gradient(parameter: torch.Tensor) -> None:
    parameter.grad = None  # (fused backward / gradient offload: stepped or copied, then freed)


def _savers(config: TrainConfig) -> dict[str, Any]:
    return {
        "gradient_checkpointing": config.gradient_checkpointing, "optimizer": config.optimizer,
        "optimizer_offload": config.optimizer_offload, "fused_backward": config.fused_backward,
        "free_encoders": config.free_encoders, "block_swap": config.block_swap,
    }


def _process_bytes() -> int:
    """This process's resident memory now: the interpreter and the libraries a training process
    imports too (its data and logging libraries are imported here first: a training process loads
    them before its first step; 🤗 datasets alone is 80 MB), from /proc/self/statm on Linux, else
    the peak so far."""
    for name in TRAINING_PROCESS_LIBRARIES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    statm = Path("/proc/self/statm")
    if statm.exists():
        import os

        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def format_estimate(estimate: MemoryEstimate) -> str:
    """The estimate as the terminal shows it: one line per term, GiB."""

    def size(value: int) -> str:
        return f"{value / GIB:.2f} GiB" if value >= GIB / 100 else f"{value / 2**20:.1f} MiB"

    where = "a CUDA GPU (memory the run allocates)" if estimate.device == "cuda" else "this CPU (the process's resident memory)"
    checkpointing = estimate.savers["gradient_checkpointing"]
    weights = " · ".join(f"{name} {size(value)}" for name, value in estimate.weights.items())
    lines = [
        f"{estimate.technique} ({estimate.kind}): batch {estimate.batch_size} × {estimate.resolution} px, "
        f"{estimate.mixed_precision if estimate.mixed_precision != 'no' else 'fp32'}, estimated for {where}",
        f"  weights                  {weights}"
        + (f" (+ {size(estimate.weights_elsewhere)} on the CPU)" if estimate.weights_elsewhere else ""),
        f"  trainable parameters     {estimate.trainable_parameters / 1e6:.2f} M",
        f"  gradients                {size(estimate.gradients)}"
        + (" (freed tensor by tensor)" if estimate.savers["fused_backward"] else ""),
        f"  optimizer states         {size(estimate.optimizer_states)} ({estimate.savers['optimizer']}"
        + (", offloaded" if estimate.savers["optimizer_offload"] else "") + ")",
        f"  EMA                      {size(estimate.ema)}",
        f"  activations              {size(estimate.activations)} saved for backward "
        f"({size(estimate.activations_other)} {'without' if checkpointing else 'with'} gradient checkpointing)",
        f"  forward + backward peak  {size(estimate.step_peak)} (activations, temporaries, gradients)",
    ]
    if estimate.process:
        lines.append(f"  the process itself       {size(estimate.process)} (the interpreter and its libraries, measured here)")
    if estimate.malloc:
        share = HEAP_KEPT_FRACTION.get(estimate.malloc, HEAP_KEPT_FRACTION["glibc"])
        lines.append(f"  malloc's free blocks     {size(estimate.heap_kept)} ({estimate.malloc}'s heap beyond the live tensors: "
                     f"{share:.2f} × the {size(estimate.step_allocated)} a step allocates, measured)")
    lines.append(f"  total                    {size(estimate.total)}")
    if estimate.fits_with is not None:
        savers = ", ".join(estimate.fits_with) if estimate.fits_with else "nothing to change"
        lines.append(f"  fits the budget with     {savers} ({size(estimate.fitted_total)})")
    lines += [f"  note: {note}" for note in estimate.notes]
    return "\n".join(lines)
