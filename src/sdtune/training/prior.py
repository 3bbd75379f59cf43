"""DreamBooth's prior preservation (Ruiz et al. 2023, "DreamBooth", §3.3, eq. 2).

The base model draws ``num_class_images`` images of the class prompt ("a photo of a toy") before
any weight changes. Every step then trains on the instance samples and as many class samples:

    loss = instance loss + λ · prior loss

each the mean diffusion loss of its half of the batch (diffusers' train_dreambooth.py chunks the
batch the same way), with λ = ``train.prior_loss_weight``.

The class images are generated once per experiment, deterministically — image i from its own seed
(``dreambooth.class_seed``, i), one image per call so its bits never depend on its batch-mates —
and written as PNGs under ``OUTPUT/.class-images/<key>/`` (key: the base model and the sampling
settings), one file at a time, atomically. Every technique, resumed run and process of the
experiment reads the same files; a run asking for more images than the folder holds generates only
the missing ones. Which class image goes with which training position is a pure function of
(seed, position), like the instance order, and so are its latent and noise draws: a resumed run
is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sdtune import diffusion
from sdtune.data.cache import cache_key
from sdtune.data.dataset import stream_samples, transform_image

if TYPE_CHECKING:
    from sdtune.config.sections import DreamBoothConfig, Experiment
    from sdtune.data.batches import MicroBatch
    from sdtune.models import Conditioning, ModelBundle

CLASS_IMAGES_DIR = ".class-images"
CLASS_STREAM = 2  # seeds class samples apart from the instance samples of the same position
INFO_FILE = "class_images.json"


def prior_preservation_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, num_instance: int,
    prior_loss_weight: float, instance_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ruiz et al. 2023, eq. 2: the mean loss of the first ``num_instance`` samples (the subject; with
    their loss masks, if any) plus ``prior_loss_weight`` × the mean loss of the rest (the class images)."""
    instance_weights = None if weights is None else weights[:num_instance]
    prior_weights = None if weights is None else weights[num_instance:]
    instance = diffusion.diffusion_loss(prediction[:num_instance], target[:num_instance], instance_weights, instance_mask)
    prior = diffusion.diffusion_loss(prediction[num_instance:], target[num_instance:], prior_weights)
    return instance + prior_loss_weight * prior


def _derive(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def class_images_folder(experiment: Experiment, output_root: Path) -> Path:
    """Where the experiment's class images live (keyed by everything that changes them)."""
    settings = dataclasses.asdict(experiment.dreambooth)
    settings.pop("num_class_images")  # more images extend the same folder
    described = {"model": dataclasses.asdict(experiment.model), "resolution": experiment.data.resolution, **settings}
    return output_root / CLASS_IMAGES_DIR / cache_key(described)


def ensure_class_images(
    experiment: Experiment, bundle: ModelBundle, output_root: Path, device: torch.device, progress: bool
) -> tuple[Path, int]:
    """Generate the class images the folder lacks with the base model (call before a technique changes
    it); return the folder and how many images were generated now."""
    from tqdm.auto import tqdm

    config, family = experiment.dreambooth, bundle.family
    folder = class_images_folder(experiment, output_root)
    folder.mkdir(parents=True, exist_ok=True)
    info = {**dataclasses.asdict(config), "model": experiment.model.path, "resolution": experiment.data.resolution}
    _write_atomic(folder / INFO_FILE, lambda path: path.write_text(json.dumps(info, indent=2)))
    missing = [i for i in range(config.num_class_images) if not class_image_path(folder, i).exists()]
    if not missing:
        return folder, 0
    pipe = family.build_pipeline(bundle).to(device)
    pipe.set_progress_bar_config(disable=True)
    size = {"height": experiment.data.resolution, "width": experiment.data.resolution, **family.generation_kwargs}
    for index in tqdm(missing, desc="class images", disable=not progress, unit="image"):
        generator = torch.Generator(device="cpu").manual_seed(_derive(config.class_seed, index))
        with torch.no_grad():
            image = pipe(
                config.class_prompt, num_inference_steps=config.class_inference_steps,
                guidance_scale=config.class_guidance_scale, generator=generator, **size,
            ).images[0]
        _write_atomic(class_image_path(folder, index), lambda path, image=image: image.save(path, format="PNG"))
    return folder, len(missing)


def class_image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def _write_atomic(path: Path, write: Any) -> None:
    """Write next to the target, then rename: a concurrent technique never reads half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    write(temporary)
    os.replace(temporary, path)


@dataclasses.dataclass
class PriorSamples:
    """The class samples added to every micro-batch, and their loss weight."""

    folder: Path
    num_images: int
    class_prompt: str
    seed: int  # the run's seed: class order, latents, noise and timesteps follow it
    resolution: int
    prior_loss_weight: float
    _posteriors: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    _text: Conditioning | None = None

    def extend(
        self, ctx: Any, batch: MicroBatch, latents: torch.Tensor, conditioning: Conditioning, generators: list
    ) -> tuple[torch.Tensor, Conditioning, list]:
        """The micro-batch with one class sample after the instance samples for each of its positions."""
        device, bundle, family = latents.device, ctx.bundle, ctx.bundle.family
        count = len(batch.positions)
        indices = stream_samples(_derive(self.seed, CLASS_STREAM), self.num_images, batch.positions[0], count)[0]
        class_generators = [
            torch.Generator(device=device).manual_seed(_derive(self.seed, position, CLASS_STREAM)) for position in batch.positions
        ]
        mean, std = (torch.stack(parts).to(device) for parts in zip(*(self._posterior(bundle, int(i), device) for i in indices)))
        class_latents = diffusion.sample_latents(mean, std, ctx.latent_scale, class_generators, ctx.latent_shift)
        class_conditioning = self._conditioning(bundle, count, ctx.train_text_encoder)
        geometry = torch.tensor([[self.resolution, self.resolution, 0, 0, self.resolution, self.resolution]] * count)
        class_conditioning.update(family.image_conditioning(geometry.to(device, ctx.weight_dtype)))
        merged = {
            name: torch.cat([value, class_conditioning[name].to(value.device, value.dtype)])
            for name, value in conditioning.items()
        }
        return torch.cat([latents, class_latents]), merged, [*generators, *class_generators]

    def _posterior(self, bundle: ModelBundle, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A class image's VAE posterior, encoded alone from its PNG on first use (the same bits in a
        resumed run)."""
        if index not in self._posteriors:
            from PIL import Image

            with Image.open(class_image_path(self.folder, index)) as image:
                pixels = transform_image(image.convert("RGB"), self.resolution, None, False)
            mean, std = bundle.family.encode_images(bundle, pixels[None].to(device))
            self._posteriors[index] = (mean[0].float().cpu(), std[0].float().cpu())
        return self._posteriors[index]

    def _conditioning(self, bundle: ModelBundle, count: int, text_encoder_trains: bool) -> Conditioning:
        """The class prompt's conditioning: through the training text encoders (with gradients) when
        they train, else encoded once."""
        if text_encoder_trains:
            return bundle.family.encode_prompt(bundle, [self.class_prompt] * count)
        if self._text is None:
            with torch.no_grad():
                self._text = bundle.family.encode_prompt(bundle, [self.class_prompt])
        return {name: value.expand(count, *value.shape[1:]) for name, value in self._text.items()}


def setup(
    experiment: Experiment, config: Any, bundle: ModelBundle, output_root: Path, accelerator: Any, progress: bool, timing: dict
) -> PriorSamples | None:
    """For a technique with ``prior_preservation``: make sure the class images exist (the main process
    generates what is missing, with the base model as loaded), then the samples to mix in; else None."""
    if not config.prior_preservation:
        return None
    dreambooth: DreamBoothConfig = experiment.dreambooth
    started = time.perf_counter()
    generated = 0
    folder = class_images_folder(experiment, output_root)
    if accelerator.is_main_process:
        folder, generated = ensure_class_images(experiment, bundle, output_root, accelerator.device, progress)
    accelerator.wait_for_everyone()
    timing["class_images_time_s"] = time.perf_counter() - started
    timing["class_images_generated"] = generated
    return PriorSamples(
        folder=folder, num_images=dreambooth.num_class_images, class_prompt=dreambooth.class_prompt, seed=config.seed,
        resolution=experiment.data.resolution, prior_loss_weight=config.prior_loss_weight,
    )
