"""The diffusion maths on tiny tensors, checked against closed forms and diffusers' scheduler."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from sdtune import diffusion


def _schedule():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return scheduler, scheduler.alphas_cumprod


def test_add_noise_and_velocity_match_diffusers():
    scheduler, alphas_cumprod = _schedule()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    torch.testing.assert_close(
        diffusion.add_noise(latents, noise, timesteps, alphas_cumprod), scheduler.add_noise(latents, noise, timesteps)
    )
    torch.testing.assert_close(
        diffusion.velocity(latents, noise, timesteps, alphas_cumprod), scheduler.get_velocity(latents, noise, timesteps)
    )


def test_targets_by_prediction_type():
    _, alphas_cumprod = _schedule()
    latents, noise, t = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0), torch.tensor([10, 20])
    assert torch.equal(diffusion.training_target("epsilon", latents, noise, t, alphas_cumprod), noise)
    assert torch.equal(diffusion.training_target("sample", latents, noise, t, alphas_cumprod), latents)
    v = diffusion.training_target("v_prediction", latents, noise, t, alphas_cumprod)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, (a.sqrt() * 2.0 - (1 - a).sqrt() * 1.0).expand_as(v))


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    eps = diffusion.min_snr_weights(snr, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 0.1]))  # min(snr, γ)/snr
    v = diffusion.min_snr_weights(snr, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0]))


def test_snr_is_monotone_decreasing():
    _, alphas_cumprod = _schedule()
    values = diffusion.snr(torch.arange(1000), alphas_cumprod)
    assert torch.all(values[1:] < values[:-1])


def test_weighted_loss_and_latent_sampling():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert diffusion.diffusion_loss(prediction, target).item() == 2.5
    assert diffusion.diffusion_loss(prediction, target, torch.tensor([1.0, 0.0])).item() == 0.5
    mean, std = torch.zeros(1000, 4), torch.full((1000, 4), 2.0)
    sample = diffusion.sample_latents(mean, std, 0.5, torch.Generator().manual_seed(0))
    assert abs(sample.std().item() - 1.0) < 0.05  # std 2 × scale 0.5


def test_noise_offset_shifts_channel_means():
    latents = torch.zeros(64, 4, 8, 8)
    plain = diffusion.sample_noise(latents, torch.Generator().manual_seed(0))
    offset = diffusion.sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=1.0)
    assert offset.mean(dim=(2, 3)).std() > 3 * plain.mean(dim=(2, 3)).std()
