"""Diffusion training maths as small pure functions of tensors (no configs, no I/O).

Two objectives, each a small frozen dataclass over these functions that the training loop calls
in the same order (timesteps → noisy latents → target → loss weights):

- :class:`DDPMObjective`: discrete-time denoising diffusion with ε, v or x0 targets (SD1/2, SDXL);
- :class:`FlowMatchingObjective`: rectified flow (SD3/3.5), x_σ = (1−σ)·x0 + σ·ε with target ε − x0,
  σ drawn uniform, logit-normal or by the mode density and shifted like the model's scheduler.

A model family names its objective; the objective never knows the family.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# A generator for the whole batch, or one per sample: with one per sample, a sample's draws depend
# only on its own generator (sdtune seeds it from the sample's global position), so a batch split
# over processes or micro-steps draws exactly what the whole batch would.
Generators = torch.Generator | Sequence[torch.Generator]


def _draw(kind: str, shape: tuple[int, ...], generator: Generators, **options) -> torch.Tensor:
    """``torch.randn`` / ``torch.rand`` / ``torch.randint`` of ``shape`` (batch first), each row
    from its own generator when given one per sample."""
    draw = {"randn": torch.randn, "rand": torch.rand, "randint": torch.randint}[kind]
    high = (options.pop("high"),) if kind == "randint" else ()
    if isinstance(generator, torch.Generator):
        return draw(*high, shape, generator=generator, **options)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.cat([draw(*high, (1, *shape[1:]), generator=g, **options) for g in generator])


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: Generators, device: torch.device
) -> torch.Tensor:
    """Uniform integer timesteps in [0, T), as in DDPM training (Ho et al. 2020, Alg. 1)."""
    return _draw("randint", (batch_size,), generator, high=num_train_timesteps, device=device).long()


def sample_noise(
    latents: torch.Tensor, generator: Generators, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise like ``latents``, plus an optional per-channel offset.

    The offset (Guttenberg 2023, "Diffusion with Offset Noise") lets the model learn very dark or
    bright images by also noising the per-channel mean.
    """
    noise = _draw("randn", tuple(latents.shape), generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        shape = (latents.shape[0], latents.shape[1], 1, 1)
        offset = _draw("randn", shape, generator, device=latents.device, dtype=latents.dtype)
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
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error, optionally weighted per sample (computed in float32). With ``mask``
    (batch, 1, h, w) in [0, 1] on the latent grid, each sample's error is the mask-weighted mean over
    its masked-in latent pixels (a sample whose mask is empty contributes 0)."""
    per_pixel = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    dims = list(range(1, per_pixel.ndim))
    if mask is None:
        per_sample = per_pixel.mean(dim=dims)
    else:
        mask = mask.float().expand_as(per_pixel)
        per_sample = (per_pixel * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1e-12)
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scale: float, generator: Generators, shift: float = 0.0
) -> torch.Tensor:
    """Draw z ~ N(mean, std²) from a VAE posterior and bring it to the denoiser's latent range.

    Same as ``(latent_dist.sample() − shift_factor) * scaling_factor`` (Rombach et al. 2022, §3 and
    App. G; SD3's VAE adds the shift), so cached distributions still give a fresh latent every step.
    """
    eps = _draw("randn", tuple(mean.shape), generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps - shift) * scale


# ----------------------------------------------------------------------------------------------
# Rectified flow (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified
# Flow Transformers for High-Resolution Image Synthesis", the SD3 paper, cited as [E24])


def flow_noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, the straight path from data (σ = 0) to noise (σ = 1) ([E24] eq. 3, 11)."""
    sigma = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - sigma) * latents + sigma * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_σ / dσ = ε − x0 that the network predicts ([E24] eq. 13 with c = 1)."""
    return noise - latents


def sample_flow_sigmas(
    batch_size: int,
    sampling: str,
    generator: Generators,
    device: torch.device,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Noise levels σ ∈ (0, 1) drawn from the training density of [E24] §3.1:

    - ``uniform``: σ ~ U(0, 1);
    - ``logit_normal``: σ = sigmoid(n), n ~ N(mean, std²) (eq. 19; SD3 trains with mean 0, std 1);
    - ``mode``: σ = 1 − u − s·(cos²(πu/2) − 1 + u), u ~ U(0, 1) (eq. 20; s = 1.29 in the paper).
    """
    if sampling == "uniform":
        return _draw("rand", (batch_size,), generator, device=device)
    if sampling == "logit_normal":
        normal = _draw("randn", (batch_size,), generator, device=device) * logit_std + logit_mean
        return torch.sigmoid(normal)
    if sampling == "mode":
        u = _draw("rand", (batch_size,), generator, device=device)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"unknown timestep sampling {sampling!r}; expected uniform, logit_normal or mode")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ): the resolution-dependent shift of [E24] §5.3.2 (eq. 23), the same
    map diffusers' FlowMatchEulerDiscreteScheduler applies with its ``shift`` (3.0 for SD3)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_loss_weights(sigmas: torch.Tensor, weighting: str) -> torch.Tensor | None:
    """Per-sample loss weights of the velocity MSE:

    - ``none``: 1 (the rectified-flow loss as is; SD3's own default);
    - ``sigma_sqrt``: σ⁻², the ε-prediction loss written for a velocity network;
    - ``cosmap``: 2 / (π·(1 − 2σ + 2σ²)), the "CosMap" weighting of [E24] §3.1 (eq. 21–22).
    """
    if weighting == "none":
        return None
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    raise ValueError(f"unknown flow weighting {weighting!r}; expected none, sigma_sqrt or cosmap")


# ----------------------------------------------------------------------------------------------
# The objectives the loop calls


@dataclass(frozen=True)
class DDPMObjective:
    """Denoising diffusion with the model's discrete noise schedule (Ho et al. 2020)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str  # epsilon | v_prediction | sample
    snr_gamma: float | None = None  # min-SNR-γ weighting

    name = "ddpm"

    def sample_timesteps(self, batch_size: int, generator: Generators, device: torch.device) -> torch.Tensor:
        return sample_timesteps(batch_size, len(self.alphas_cumprod), generator, device)

    def noisy_latents(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise(latents, noise, timesteps, self.alphas_cumprod)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return training_target(self.prediction_type, latents, noise, timesteps, self.alphas_cumprod)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.snr_gamma is None:
            return None
        return min_snr_weights(snr(timesteps, self.alphas_cumprod), self.snr_gamma, self.prediction_type)


@dataclass(frozen=True)
class FlowMatchingObjective:
    """Rectified flow as SD3 trains it; the denoiser's timestep is σ · num_train_timesteps."""

    num_train_timesteps: int
    shift: float = 1.0
    sampling: str = "logit_normal"  # uniform | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"  # none | sigma_sqrt | cosmap

    name = "flow"
    prediction_type = "flow"

    def sample_timesteps(self, batch_size: int, generator: Generators, device: torch.device) -> torch.Tensor:
        sigmas = sample_flow_sigmas(
            batch_size, self.sampling, generator, device, self.logit_mean, self.logit_std, self.mode_scale
        )
        return shift_sigmas(sigmas, self.shift) * self.num_train_timesteps

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps / self.num_train_timesteps

    def noisy_latents(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_noisy_latents(latents, noise, self.sigmas(timesteps))

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_target(latents, noise)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        return flow_loss_weights(self.sigmas(timesteps), self.weighting)


# ----------------------------------------------------------------------------------------------
# Building an objective from the model's schedule and the run's settings


@dataclass(frozen=True)
class NoiseSchedule:
    """A model's training schedule as its scheduler config states it (what the model knows)."""

    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None = None  # DDPM: ᾱ_t of every timestep
    prediction_type: str | None = None  # DDPM: what the model was trained to predict
    shift: float = 1.0  # flow: the scheduler's σ shift


@dataclass(frozen=True)
class ObjectiveSettings:
    """The run's choices about its objective (keys of the experiment's ``train`` section)."""

    prediction_type: str | None = None  # DDPM: None = the model's own
    snr_gamma: float | None = None  # DDPM: min-SNR-γ weighting
    timestep_sampling: str | None = None  # flow: uniform | logit_normal | mode
    logit_mean: float | None = None
    logit_std: float | None = None
    mode_scale: float | None = None
    flow_weighting: str | None = None  # flow: none | sigma_sqrt | cosmap


# Settings that belong to one objective: a family of the other rejects them (sdtune.experiment).
OBJECTIVE_KEYS = {
    "ddpm": ("snr_gamma", "prediction_type"),
    "flow": ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "flow_weighting"),
}
# Esser et al. 2024 (SD3): logit-normal(0, 1) sampling; mode scale 1.29; no weighting
FLOW_DEFAULTS = {"timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                 "flow_weighting": "none"}


def build_objective(
    kind: str, schedule: NoiseSchedule, settings: ObjectiveSettings
) -> DDPMObjective | FlowMatchingObjective:
    """The objective of ``kind`` ("ddpm" or "flow") on the model's schedule with the run's settings
    (a setting left None takes the model's value or the paper's default)."""
    if kind == "flow":
        flow = {key: getattr(settings, key) for key in OBJECTIVE_KEYS["flow"]}
        flow = {key: FLOW_DEFAULTS[key] if value is None else value for key, value in flow.items()}
        return FlowMatchingObjective(
            num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift,
            sampling=flow["timestep_sampling"], logit_mean=flow["logit_mean"], logit_std=flow["logit_std"],
            mode_scale=flow["mode_scale"], weighting=flow["flow_weighting"],
        )
    if kind != "ddpm":
        raise ValueError(f"unknown objective {kind!r}")
    return DDPMObjective(
        alphas_cumprod=schedule.alphas_cumprod, prediction_type=settings.prediction_type or schedule.prediction_type,
        snr_gamma=settings.snr_gamma,
    )
