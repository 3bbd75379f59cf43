"""Evaluation while a technique trains: validation loss and images at ``evaluation.every_steps``.

A side effect the training loop calls (:meth:`TrainingEvaluator.after_step`); nothing here changes
what the loop computes. Before the first step, at every ``evaluation.every_steps`` and
``evaluation.validation_every_steps`` step, where a run is asked to stop (``stop_after``: a
scheduler compares trials there) and at the end it records, in the run's :class:`TrainState` (and so in its train record and its checkpoints):

- the **validation loss**: the denoising loss (:mod:`sdtune.training.step`, as the loop computes it)
  on the held-out images of ``data.validation`` at ``evaluation.validation_timesteps`` fixed timesteps
  (evenly spaced quantiles of the schedule) and fixed noise (seeded per image and timestep), so runs,
  techniques and checkpoints are comparable;
- at the intermediate steps, the plan's prompts × seeds (the first
  ``evaluation.seeds_per_prompt_during_training`` seeds) generated with the live model (EMA weights
  when the technique keeps an EMA) into ``RUN/evaluation/step-N/``; ``sdtune compare`` measures
  them afterwards with the same metrics as the finished models.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdtune import diffusion
from sdtune.data.dataset import crop_geometry, transform_image
from sdtune.data.heldout import RealImage, validation_images
from sdtune.experiment import Experiment
from sdtune.models import Model
from sdtune.models.sampling import generate_images, save_images, set_scheduler
from sdtune.training.savers import modules_on
from sdtune.training.setup import TrainingRun
from sdtune.training.state import TrainState
from sdtune.training.step import denoising_loss
from sdtune.util.seeding import derive_seed

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

    @classmethod
    def from_images(cls, images: list[RealImage], resolution: int) -> ValidationBatch | None:
        """Centre-cropped, unflipped (None when there are no images)."""
        if not images:
            return None
        return cls(
            torch.stack([transform_image(item.image, resolution, None, False) for item in images]),
            [item.caption for item in images],
            torch.tensor([crop_geometry(item.image.size, resolution, None, False) for item in images], dtype=torch.float32),
        )


@torch.no_grad()
def validation_loss(
    model: Model, objective: Any, batch: ValidationBatch, timesteps: torch.Tensor, batch_size: int, seed: int = 0
) -> list[float]:
    """The mean denoising loss of the validation images at each of ``timesteps`` (one value per
    timestep), with the noise and the latent draw seeded by (seed, image, timestep): deterministic."""
    device = next(model.denoiser.parameters()).device
    per_timestep = []
    for k, timestep in enumerate(timesteps.tolist()):
        total = 0.0
        for start in range(0, len(batch.captions), batch_size):
            rows = range(start, min(start + batch_size, len(batch.captions)))
            generators = [torch.Generator(device=device).manual_seed(derive_seed(seed, row, k)) for row in rows]
            mean, std = model.encode_images(batch.pixels[rows.start : rows.stop].to(device))
            latents = diffusion.sample_latents(mean.float(), std.float(), model.latent_scale, generators, model.latent_shift)
            noise = diffusion.sample_noise(latents, generators, 0.0)
            steps = torch.full((len(rows),), timestep, device=device, dtype=timesteps.dtype)
            conditioning = model.encode_prompt([batch.captions[r] for r in rows])
            geometry = batch.geometry[rows.start : rows.stop].to(device, next(model.denoiser.parameters()).dtype)
            conditioning.update(model.image_conditioning(geometry))
            loss = denoising_loss(model, objective, latents, noise, steps, conditioning)
            total += float(loss) * len(rows)
        per_timestep.append(total / len(batch.captions))
    return per_timestep


class TrainingEvaluator:
    """The loop's evaluation side effect (see the module docstring); :meth:`create` returns None
    when the experiment asks for none (no ``evaluation.every_steps`` and no ``data.validation``)."""

    def __init__(self, experiment: Experiment, batch: ValidationBatch | None) -> None:
        self.experiment, self.batch = experiment, batch
        self.every = experiment.evaluation.every_steps
        self.validation_every = experiment.evaluation.validation_every_steps if batch is not None else None

    @classmethod
    def create(cls, experiment: Experiment, is_main_process: bool) -> TrainingEvaluator | None:
        if experiment.evaluation.every_steps is None and experiment.validation is None:
            return None
        batch = None
        if is_main_process and experiment.validation is not None:
            images = validation_images(experiment.data, experiment.validation, experiment.evaluation.max_reference_images)
            batch = ValidationBatch.from_images(images, experiment.data.resolution)
        return cls(experiment, batch)

    def due(self, step: int, max_steps: int) -> bool:
        return (
            step == max_steps or bool(self.every) and step % self.every == 0
            or bool(self.validation_every) and step % self.validation_every == 0
        )

    def after_step(self, step: int, run: TrainingRun, state: TrainState) -> None:
        """On the main process: evaluate the model as it is after ``step`` and add the entry to the state."""
        accelerator = run.accelerator
        if accelerator.is_main_process:
            model = run.unwrapped_model()
            parameters = list(run.parameters.values())
            if run.ema is not None:  # evaluate the weights the technique saves
                run.ema.store(parameters)
                run.ema.copy_to(parameters)
            modules = [m for m in model.components.values() if isinstance(m, torch.nn.Module)]
            training = [m.training for m in modules]
            for module in modules:
                module.eval()
            parked = [model.components[name] for name in run.inputs.parked]  # train.free_encoders
            try:
                with accelerator.autocast(), modules_on(parked, accelerator.device, self.experiment.evaluation.cpu_offload):
                    entry = self._entry(step, run, model)
            finally:
                for module, mode in zip(modules, training):
                    module.train(mode)
                if run.ema is not None:
                    run.ema.restore(parameters)
            state.record_evaluation(entry)
            accelerator.log({k: v for k, v in entry.items() if k == "validation_loss" and v is not None}, step=step)
        accelerator.wait_for_everyone()

    def _entry(self, step: int, run: TrainingRun, model: Model) -> dict[str, Any]:
        entry: dict[str, Any] = {"step": step, "validation_loss": None, "images": None}
        if self.batch is not None:
            timesteps = fixed_timesteps(run.objective, self.experiment.evaluation.validation_timesteps)
            # the captions as the text encoders see them in training (textual inversion: all its vectors)
            batch = dataclasses.replace(self.batch, captions=[run.technique.transform_caption(c) for c in self.batch.captions])
            losses = validation_loss(
                model, run.objective, batch, timesteps, run.config.batch_size, seed=self.experiment.validation.seed
            )
            entry["validation_loss"] = float(np.mean(losses))
            entry["validation_images"] = len(self.batch.captions)
            entry["validation_loss_per_timestep"] = {str(t): v for t, v in zip(timesteps.tolist(), losses)}
        if self.every and step % self.every == 0 and 0 < step < run.max_steps:  # 0 and the end: compare's evaluations
            entry["images"], entry["generation"] = self._generate(step, run, model)
        return entry

    def _generate(self, step: int, run: TrainingRun, model: Model) -> tuple[str, dict[str, Any]]:
        experiment = self.experiment
        settings = experiment.evaluation
        pipe = model.pipeline()
        set_scheduler(pipe, settings.scheduler)
        started = time.perf_counter()
        result = generate_images(
            pipe, [], [], settings.num_inference_steps, settings.guidance_scale, experiment.eval_resolution,
            progress=False, pairs=experiment.training_plan.pairs(),
        )
        folder = STEP_FOLDER.format(step)
        save_images(result, run.run_dir / folder)
        generation = {
            "source": "live model", "time_s": time.perf_counter() - started,
            "latency_s_mean": float(np.mean(result.latencies_s)),
            "num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
            "scheduler": type(pipe.scheduler).__name__, "resolution": experiment.eval_resolution,
        }
        return folder, generation
