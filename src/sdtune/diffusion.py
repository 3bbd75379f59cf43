"""Diffusion training maths as small pure functions of tensors (no configs, no I/O)."""

from __future__ import annotations

import torch


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Uniform integer timesteps in [0, T), as in DDPM training (Ho et al. 2020, Alg. 1)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise like ``latents``, plus an optional per-channel offset.

    The offset (Guttenberg 2023, "Diffusion with Offset Noise") lets the model learn very dark or
    bright images by also noising the per-channel mean.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1),
            generator=generator,
            device=latents.device,
            dtype=latents.dtype,
        )
        noise = noise + noise_offset * offset
    return noise


def _gather(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps].to(like.dtype)
    return values.view(-1, *([1] * (like.ndim - 1)))


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """q(x_t | x_0) = sqrt(ᾱ_t)·x_0 + sqrt(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4)."""
    alpha_bar = _gather(alphas_cumprod, timesteps, latents)
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise


def velocity(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x_0 (Salimans & Ho 2022, "Progressive Distillation", §4)."""
    alpha_bar = _gather(alphas_cumprod, timesteps, latents)
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents


def training_target(
    prediction_type: str,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """What the network is trained to predict: the noise, the velocity, or the clean sample."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(latents, noise, timesteps, alphas_cumprod)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep (Kingma et al. 2021, "VDM")."""
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy", eq. 8), expressed for an ε- or v-prediction MSE loss.

    For ε-prediction the weight is min(SNR, γ)/SNR; for v-prediction min(SNR, γ)/(SNR + 1).
    """
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    return clipped  # x0-prediction: the paper's weight is min(SNR, γ) itself


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error, optionally weighted per sample (computed in float32)."""
    per_sample = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """Draw z ~ N(mean, std²) from a VAE posterior and scale it to the UNet's latent range.

    Same as ``latent_dist.sample() * scaling_factor`` (Rombach et al. 2022, §3 and App. G), so cached
    distributions still give a fresh latent every step.
    """
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale
