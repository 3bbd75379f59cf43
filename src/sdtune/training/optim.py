"""The optimizer (AdamW: torch's fused kernel, or bitsandbytes' 8-bit), the learning-rate schedule
(diffusers') and the EMA of the trained weights, built from the run's settings."""

from __future__ import annotations

from typing import Any

import torch

from sdtune.config import TrainConfig
from sdtune.techniques import Technique
from sdtune.training.ema import LerpEMA


def has_fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for this device (CUDA; the CPU since torch 2.4)."""
    if device.type == "cuda":
        return True
    release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return device.type == "cpu" and release >= (2, 4)


def parameter_groups(
    technique: Technique, parameters: dict[str, torch.nn.Parameter], denoiser: str, learning_rate: float
) -> list[dict[str, Any]]:
    """The denoiser's tensors at ``learning_rate`` and the text encoders' at the technique's text-encoder
    rate (or the same), each split further as the technique says (LoRA+). The order is fixed, so a
    resumed run restores each group's state into the same group."""
    text_lr = technique.options.text_encoder_learning_rate or learning_rate
    prefix = denoiser + "."
    return [
        *technique.parameter_groups({n: p for n, p in parameters.items() if n.startswith(prefix)}, learning_rate),
        *technique.parameter_groups({n: p for n, p in parameters.items() if not n.startswith(prefix)}, text_lr),
    ]


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``groups`` with the train section's betas, weight decay and epsilon."""
    optimizer_class, kernel = torch.optim.AdamW, {}
    if config.use_8bit_adam:  # the config check made sure bitsandbytes imports
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    elif has_fused_adamw(device):
        # one pass over each tensor (torch's default on the CPU is a per-tensor loop of ~10 ops: on SD
        # 1.5's 860 M UNet weights 3.76 s per step instead of 0.77 s on this project's CPU machines)
        kernel = {"fused": True}
    return optimizer_class(
        groups, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon, **kernel,
    )


def build_lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, max_steps: int) -> Any:
    """diffusers' schedule, stepped once per optimizer step by the loop itself (not prepared by
    accelerate, so it is not scaled by the number of processes)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=max_steps
    )


def build_ema(tensors: list[torch.Tensor], config: TrainConfig, device: torch.device) -> LerpEMA | None:
    """The EMA of ``tensors`` (one lerp per tensor; multi-tensor on CUDA only: on the CPU it is no
    faster), or None without ``use_ema``."""
    if not config.use_ema:
        return None
    ema = LerpEMA(tensors, decay=config.ema_decay, foreach=device.type == "cuda")
    ema.to(device)
    return ema
