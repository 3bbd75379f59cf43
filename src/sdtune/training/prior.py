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
the missing ones (or the unreadable ones, each drawn again and replaced whole). Which class image goes with which training position is a pure function of
(seed, position), like the instance order, and so are its latent and noise draws: a resumed run
is bit-exact.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from sdtune import diffusion
from sdtune.config import DreamBoothConfig, TrainConfig
from sdtune.data.cache import cache_key
from sdtune.data.dataset import stream_samples
from sdtune.experiment import Experiment
from sdtune.models import Model
from sdtune.util import atomic
from sdtune.util.seeding import derive_seed

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



def class_images_folder(experiment: Experiment, output_root: Path) -> Path:
    """Where the experiment's class images live (keyed by everything that changes them)."""
    settings = dataclasses.asdict(experiment.dreambooth)
    settings.pop("num_class_images")  # more images extend the same folder
    described = {"model": dataclasses.asdict(experiment.model), "resolution": experiment.data.resolution, **settings}
    return output_root / CLASS_IMAGES_DIR / cache_key(described)


def ensure_class_images(
    experiment: Experiment, model: Model, output_root: Path, device: torch.device, progress: bool
) -> tuple[Path, int]:
    """Generate the class images the folder lacks with the base model (call before a technique changes
    it); return the folder and how many images were generated now."""
    from tqdm.auto import tqdm

    config = experiment.dreambooth
    folder = class_images_folder(experiment, output_root)
    folder.mkdir(parents=True, exist_ok=True)
    info = {**dataclasses.asdict(config), "model": experiment.model.path, "resolution": experiment.data.resolution}
    atomic.write_json(folder / INFO_FILE, info)
    # missing, or unreadable (a disk that failed under an earlier run): drawn again, each replaced whole
    missing = [i for i in range(config.num_class_images) if not readable_image(class_image_path(folder, i))]
    if not missing:
        return folder, 0
    pipe = model.pipeline().to(device)
    pipe.set_progress_bar_config(disable=True)
    size = {"height": experiment.data.resolution, "width": experiment.data.resolution, **model.generation_kwargs}
    for index in tqdm(missing, desc="class images", disable=not progress, unit="image"):
        generator = torch.Generator(device="cpu").manual_seed(derive_seed(config.class_seed, index))
        with torch.no_grad():
            image = pipe(
                config.class_prompt, num_inference_steps=config.class_inference_steps,
                guidance_scale=config.class_guidance_scale, generator=generator, **size,
            ).images[0]
        atomic.save_image(class_image_path(folder, index), image)
    return folder, len(missing)


def class_image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def readable_image(path: Path) -> bool:
    """Whether ``path`` is an image file PIL can read through (its checksums verified)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # missing, or damaged: PIL raises many types
        return False
    return True



@dataclasses.dataclass(frozen=True)
class PriorSamples:
    """The class samples added to every micro-batch (encoded by :class:`sdtune.training.inputs.InputPipeline`).
    Their weight in the loss, λ, is the run's ``train.prior_loss_weight``, which the loop passes to
    the loss itself (one source: the train settings)."""

    folder: Path
    num_images: int
    class_prompt: str
    seed: int  # the run's seed: class order, latents, noise and timesteps follow it
    resolution: int

    def plan(self, positions: list[int], device: torch.device) -> tuple[list[int], list[torch.Generator]]:
        """For each training position: its class image (a pure function of (seed, position), like the
        instance order) and the generator of its latent, noise and timestep draws."""
        indices = stream_samples(derive_seed(self.seed, CLASS_STREAM), self.num_images, positions[0], len(positions))[0]
        generators = [
            torch.Generator(device=device).manual_seed(derive_seed(self.seed, position, CLASS_STREAM)) for position in positions
        ]
        return [int(index) for index in indices], generators


def setup(
    experiment: Experiment, config: TrainConfig, model: Model, output_root: Path, accelerator: Accelerator, progress: bool,
    timing: dict[str, float],
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
        folder, generated = ensure_class_images(experiment, model, output_root, accelerator.device, progress)
    accelerator.wait_for_everyone()
    timing["class_images_time_s"] = time.perf_counter() - started
    timing["class_images_generated"] = generated
    return PriorSamples(
        folder=folder, num_images=dreambooth.num_class_images, class_prompt=dreambooth.class_prompt, seed=config.seed,
        resolution=experiment.data.resolution,
    )
