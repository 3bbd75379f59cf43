"""The denoising loss of one batch, shared by the training loop and the validation loss.

Given latents, noise and timesteps, the objective (:mod:`sdtune.diffusion`: DDPM or rectified flow,
in fp32) noises the latents and names the target; the family calls its denoiser; the loss is the
weighted MSE, or with DreamBooth's class samples the instance loss plus λ × the prior loss. The
training loop draws noise and timesteps at random (from each sample's own generator); the validation
loss fixes them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from sdtune import diffusion
from sdtune.models import Conditioning, Model
from sdtune.training.prior import prior_preservation_loss


def as_dtype(conditioning: Conditioning, dtype: torch.dtype) -> Conditioning:
    """Floating-point conditioning tensors in ``dtype`` (DeepSpeed's bf16 engine takes bf16 inputs)."""
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in conditioning.items()}


def denoising_loss(
    model: Model,
    objective: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: Conditioning,
    *,
    mask: torch.Tensor | None = None,
    num_instance: int | None = None,
    prior_loss_weight: float = 1.0,
    input_dtype: torch.dtype = torch.float32,
    autocast: Any = None,
) -> torch.Tensor:
    """The loss of predicting the target from ``latents`` noised by ``noise`` at ``timesteps``.

    ``num_instance`` (DreamBooth): the first that many samples are the subject's, the rest class
    samples (Ruiz et al. 2023, eq. 2). ``input_dtype``: the denoiser's input dtype (fp32 unless the
    DeepSpeed bf16 engine runs it). ``autocast``: the mixed-precision context the denoiser runs in."""
    noisy_latents = objective.noisy_latents(latents, noise, timesteps)
    target = objective.target(latents, noise, timesteps)
    with autocast if autocast is not None else contextlib.nullcontext():
        prediction = model.predict(noisy_latents.to(input_dtype), timesteps, as_dtype(conditioning, input_dtype))
    weights = objective.loss_weights(timesteps)
    if num_instance is None:
        return diffusion.diffusion_loss(prediction, target, weights, mask)
    return prior_preservation_loss(prediction, target, weights, num_instance, prior_loss_weight, mask)
