"""Evaluation while a technique trains: validation loss and images at ``evaluation.every_steps``.

A side effect the training loop calls (:meth:`TrainingEvaluator.after_step`); nothing here changes
what the loop computes. Before the first step, at every ``evaluation.every_steps`` step and at the
end it records, in the run's state (and so in its train record and its checkpoints):

- the **validation loss**: the denoising loss on the held-out images of ``data.validation`` at
  ``evaluation.validation_timesteps`` fixed timesteps (evenly spaced quantiles of the schedule) and
  fixed noise (seeded per image and timestep), so runs, techniques and checkpoints are comparable;
- at the intermediate steps, the plan's prompts × seeds generated with the live model (EMA weights
  when the technique keeps an EMA) into ``RUN/evaluation/step-N/``; ``sdtune compare`` measures
  them afterwards with the same metrics as the finished models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtune import diffusion
from sdtune.config.sections import Experiment
from sdtune.config.split import parse_validation
from sdtune.evaluation.evaluate import EvaluationPlan, eval_resolution, validation_rows
from sdtune.generation import generate_images, save_images, set_scheduler

STEP_FOLDER = "evaluation/step-{:06d}"


def fixed_timesteps(objective: Any, count: int) -> torch.Tensor:
    """``count`` timesteps at the quantiles (k + ½)/count of the objective's schedule: DDPM's
    discrete steps, or rectified flow's σ (shifted as the objective shifts it) × num_train_timesteps."""
    quantiles = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    if objective.name == "ddpm":
        return (quantiles * len(objective.alphas_cumprod)).long()
    return (diffusion.shift_sigmas(quantiles, objective.shift) * objective.num_train_timesteps).float()


@dataclass
class ValidationBatch:
    """The validation images as the loss needs them: pixels in [-1, 1], captions, SDXL geometry."""

    pixels: torch.Tensor  # (n, 3, resolution, resolution)
    captions: list[str]
    geometry: torch.Tensor  # (n, 6)


def load_validation_batch(experiment: Experiment, limit: int) -> ValidationBatch | None:
    """Up to ``limit`` validation images, centre-cropped, unflipped (None without ``data.validation``)."""
    from sdtune.data.dataset import caption_text, crop_geometry, decode_image, transform_image

    if parse_validation(experiment.data.validation) is None:
        return None
    dataset, image_column, caption_column, base_dir, rows = validation_rows(experiment)
    resolution = experiment.data.resolution
    pixels, captions, geometry = [], [], []
    for row in rows[:limit]:
        try:
            image = decode_image(dataset[row][image_column], base_dir)
        except Exception:
            continue  # unreadable: as in training, skipped
        pixels.append(transform_image(image, resolution, None, False))
        captions.append(caption_text(dataset[row][caption_column]))
        geometry.append(crop_geometry(image.size, resolution, None, False))
    if not pixels:
        return None
    return ValidationBatch(torch.stack(pixels), captions, torch.tensor(geometry, dtype=torch.float32))


@torch.no_grad()
def validation_loss(
    bundle: Any, objective: Any, batch: ValidationBatch, timesteps: torch.Tensor, batch_size: int,
    latent_scale: float, latent_shift: float, seed: int = 0,
) -> list[float]:
    """The mean denoising loss of the validation images at each of ``timesteps`` (one value per
    timestep), with the noise and the latent draw seeded by (seed, image, timestep): deterministic."""
    family = bundle.family
    device = next(bundle.denoiser.parameters()).device
    per_timestep = []
    for k, timestep in enumerate(timesteps.tolist()):
        total = 0.0
        for start in range(0, len(batch.captions), batch_size):
            rows = range(start, min(start + batch_size, len(batch.captions)))
            generators = [torch.Generator(device=device).manual_seed(_derive(seed, row, k)) for row in rows]
            mean, std = family.encode_images(bundle, batch.pixels[rows.start : rows.stop].to(device))
            latents = diffusion.sample_latents(mean.float(), std.float(), latent_scale, generators, latent_shift)
            noise = diffusion.sample_noise(latents, generators, 0.0)
            steps = torch.full((len(rows),), timestep, device=device, dtype=timesteps.dtype)
            conditioning = family.encode_prompt(bundle, [batch.captions[r] for r in rows])
            geometry = batch.geometry[rows.start : rows.stop].to(device, next(bundle.denoiser.parameters()).dtype)
            conditioning.update(family.image_conditioning(geometry))
            prediction = family.predict(bundle, objective.noisy_latents(latents, noise, steps), steps, conditioning)
            loss = diffusion.diffusion_loss(prediction, objective.target(latents, noise, steps), objective.loss_weights(steps))
            total += float(loss) * len(rows)
        per_timestep.append(total / len(batch.captions))
    return per_timestep


def _derive(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class TrainingEvaluator:
    """The loop's evaluation side effect (see the module docstring); :meth:`create` returns None
    when the experiment asks for none (no ``evaluation.every_steps`` and no ``data.validation``)."""

    def __init__(self, experiment: Experiment, run_dir: Path, batch: ValidationBatch | None) -> None:
        self.experiment, self.run_dir, self.batch = experiment, run_dir, batch
        self.every = experiment.evaluation.every_steps
        self.plan = EvaluationPlan.from_experiment(experiment)

    @classmethod
    def create(cls, experiment: Experiment, run_dir: Path, is_main_process: bool) -> TrainingEvaluator | None:
        if experiment.evaluation.every_steps is None and parse_validation(experiment.data.validation) is None:
            return None
        limit = experiment.evaluation.max_reference_images
        return cls(experiment, run_dir, load_validation_batch(experiment, limit) if is_main_process else None)

    def due(self, step: int, max_steps: int) -> bool:
        return step == max_steps or bool(self.every) and step % self.every == 0

    def after_step(self, step: int, max_steps: int, ctx: Any, bundle: Any, ema: Any, state: dict) -> None:
        """On the main process: evaluate the model as it is after ``step`` and append the entry to
        ``state["evaluation"]`` (an entry for the same step, from before a resume, is replaced)."""
        accelerator = ctx.accelerator
        if accelerator.is_main_process:
            parameters = list(ctx.parameters.values())
            if ema is not None:  # evaluate the weights the technique saves
                ema.store(parameters)
                ema.copy_to(parameters)
            modules = [m for m in bundle.components.values() if isinstance(m, torch.nn.Module)]
            training = [m.training for m in modules]
            for module in modules:
                module.eval()
            try:
                with accelerator.autocast():
                    entry = self._entry(step, max_steps, ctx, bundle)
            finally:
                for module, mode in zip(modules, training):
                    module.train(mode)
                if ema is not None:
                    ema.restore(parameters)
            history = [e for e in state.setdefault("evaluation", []) if e["step"] != step]
            state["evaluation"] = [*history, entry]
            accelerator.log({k: v for k, v in entry.items() if k == "validation_loss" and v is not None}, step=step)
        accelerator.wait_for_everyone()

    def _entry(self, step: int, max_steps: int, ctx: Any, bundle: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"step": step, "validation_loss": None, "images": None}
        if self.batch is not None:
            timesteps = fixed_timesteps(ctx.objective, self.experiment.evaluation.validation_timesteps)
            losses = validation_loss(
                bundle, ctx.objective, self.batch, timesteps, ctx.config.batch_size, ctx.latent_scale,
                ctx.latent_shift, seed=parse_validation(self.experiment.data.validation).seed,
            )
            entry["validation_loss"] = float(np.mean(losses))
            entry["validation_loss_per_timestep"] = {str(t): v for t, v in zip(timesteps.tolist(), losses)}
        if self.every and step % self.every == 0 and 0 < step < max_steps:  # 0 and the end: compare's evaluations
            entry["images"], entry["generation"] = self._generate(step, bundle)
        return entry

    def _generate(self, step: int, bundle: Any) -> tuple[str, dict[str, Any]]:
        settings = self.experiment.evaluation
        pipe = bundle.family.build_pipeline(bundle)
        set_scheduler(pipe, settings.scheduler)
        started = time.perf_counter()
        result = generate_images(
            pipe, [], [], settings.num_inference_steps, settings.guidance_scale, eval_resolution(self.experiment),
            progress=False, pairs=self.plan.pairs(),
        )
        folder = STEP_FOLDER.format(step)
        save_images(result, self.run_dir / folder)
        generation = {
            "source": "live model", "time_s": time.perf_counter() - started,
            "latency_s_mean": float(np.mean(result.latencies_s)),
            "num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
            "scheduler": type(pipe.scheduler).__name__, "resolution": eval_resolution(self.experiment),
        }
        return folder, generation
