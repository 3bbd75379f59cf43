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


# --- rectified flow (Esser et al. 2024), against closed forms ---


def test_flow_path_endpoints_and_velocity():
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 16, 4, 4, generator=generator), torch.randn(4, 16, 4, 4, generator=generator)
    at = lambda s: diffusion.flow_noisy_latents(latents, noise, torch.full((4,), s))  # noqa: E731
    torch.testing.assert_close(at(0.0), latents)
    torch.testing.assert_close(at(1.0), noise)
    torch.testing.assert_close(at(0.25), 0.75 * latents + 0.25 * noise)
    # the target is the path's derivative dx/dσ, the same at every σ (a straight line)
    torch.testing.assert_close((at(0.7) - at(0.3)) / 0.4, diffusion.flow_target(latents, noise), rtol=1e-4, atol=1e-4)


def test_shift_matches_the_formula_and_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(diffusion.shift_sigmas(sigmas, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(diffusion.shift_sigmas(sigmas, 1.0), sigmas)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # its sigma table is the shifted one
    unshifted = torch.linspace(1, 1 / 1000, 1000)
    torch.testing.assert_close(diffusion.shift_sigmas(unshifted, 3.0), scheduler.sigmas.float(), rtol=1e-5, atol=1e-5)


def test_flow_timestep_densities():
    generator = torch.Generator().manual_seed(0)
    draw = lambda mode, **kw: diffusion.sample_flow_sigmas(200_000, mode, generator, torch.device("cpu"), **kw)  # noqa: E731
    uniform = draw("uniform")
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    logit = draw("logit_normal", logit_mean=0.0, logit_std=1.0)
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.median() - 0.5) < 0.01
    # the median of sigmoid(N(m, s)) is sigmoid(m)
    assert abs(draw("logit_normal", logit_mean=1.0, logit_std=1.0).median() - torch.sigmoid(torch.tensor(1.0))) < 0.01
    # mode with scale 0 is 1 − u: uniform again; with s > 0 it puts more mass mid-range
    assert abs(draw("mode", mode_scale=0.0).mean() - 0.5) < 0.01
    mid = lambda x: ((x > 0.25) & (x < 0.75)).float().mean()  # noqa: E731
    assert mid(draw("mode", mode_scale=1.29)) > mid(uniform) + 0.05


def test_flow_loss_weights():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    assert diffusion.flow_loss_weights(sigmas, "none") is None
    torch.testing.assert_close(diffusion.flow_loss_weights(sigmas, "sigma_sqrt"), 1 / sigmas**2)
    cosmap = 2 / (torch.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    torch.testing.assert_close(diffusion.flow_loss_weights(sigmas, "cosmap"), cosmap)


def test_flow_objective_timesteps_are_shifted_sigmas_times_t():
    objective = diffusion.FlowMatchingObjective(num_train_timesteps=1000, shift=3.0, sampling="uniform")
    timesteps = objective.sample_timesteps(8, torch.Generator().manual_seed(1), torch.device("cpu"))
    raw = diffusion.sample_flow_sigmas(8, "uniform", torch.Generator().manual_seed(1), torch.device("cpu"))
    torch.testing.assert_close(timesteps, diffusion.shift_sigmas(raw, 3.0) * 1000)
    latents, noise = torch.zeros(8, 2, 2, 2), torch.ones(8, 2, 2, 2)
    noisy = objective.noisy_latents(latents, noise, timesteps)
    torch.testing.assert_close(noisy[:, 0, 0, 0], timesteps / 1000)  # x_σ = σ when x0 = 0, ε = 1


def test_latent_shift_and_scale():
    mean, std = torch.full((1, 16, 2, 2), 0.5), torch.zeros(1, 16, 2, 2)
    latents = diffusion.sample_latents(mean, std, 1.5305, torch.Generator().manual_seed(0), shift=0.0609)
    torch.testing.assert_close(latents, torch.full((1, 16, 2, 2), (0.5 - 0.0609) * 1.5305))
