"""Sampling with a diffusers pipeline: one image per (prompt, seed), each from its own seeded
generator, with device-synchronised per-image latency; and the facts of a pipeline's family."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtune.errors import UserError
from sdtune.models.base import FAMILIES
from sdtune.util import atomic
from sdtune.util.device import synchronize


@dataclass
class GenerationResult:
    images: list[Any]  # PIL images, in order of (prompt, seed)
    prompts: list[str]
    seeds: list[int]
    paths: list[Path] = field(default_factory=list)
    load_time_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # per image, warm-up excluded
    base_quantization: dict[str, Any] | None = None  # how the base was loaded (None: full precision)


class GenerationArgumentError(UserError, ValueError):
    """A bad argument of ``sdtune generate`` (the message names it and what is allowed)."""


def pipeline_fact(pipe: Any, name: str) -> Any:
    """A family fact (``denoiser_name``, ``generation_kwargs``) of a pipeline, read from the registered
    families with its pipeline class: every such family must agree on it (SD1 and SD2 share a class,
    and its facts), so the pipeline's family never has to be guessed."""
    values = [getattr(FAMILIES.get(n), name) for n in FAMILIES if FAMILIES.get(n).pipeline_class_name == type(pipe).__name__]
    if not values or any(value != values[0] for value in values):
        raise ValueError(f"{type(pipe).__name__}: no registered family, or families that disagree on {name}")
    return values[0]


def denoiser_of(pipe: Any) -> torch.nn.Module:
    return getattr(pipe, pipeline_fact(pipe, "denoiser_name"))


def set_scheduler(pipe: Any, name: str | None) -> None:
    """Swap the sampler by diffusers class name (e.g. DDIMScheduler), keeping the noise schedule."""
    if name:
        pipe.scheduler = scheduler_class(name).from_config(pipe.scheduler.config)


def scheduler_class(name: str) -> Any:
    """The diffusers scheduler class of that name; a :class:`GenerationArgumentError` otherwise."""
    import diffusers

    found = getattr(diffusers, name, None)
    if found is None or not hasattr(found, "from_config") or "Scheduler" not in name:
        raise GenerationArgumentError(
            f"scheduler {name!r} is not a diffusers scheduler class; give one such as DDIMScheduler or EulerDiscreteScheduler"
        )
    return found


def generate_images(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int | tuple[int, int] | None = None,
    progress: bool = True,
    pairs: list[tuple[str, int]] | None = None,
) -> GenerationResult:
    """One image per (prompt, seed) — every pair of ``prompts`` × ``seeds``, or the given ``pairs``
    (a process's share) — each from its own seeded generator (same noise for every model).
    ``resolution``: a square side, or (width, height) such as a training bucket."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    device = pipe.device
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution or (None, None)
    size = {"height": height, "width": width} if width else {}
    size.update(pipeline_fact(pipe, "generation_kwargs"))  # sample as the model was trained (SD3: T5 length)
    pairs = pairs if pairs is not None else [(prompt, seed) for prompt in prompts for seed in seeds]
    result = GenerationResult(images=[], prompts=[], seeds=[])
    if not pairs:
        return result
    pipe(pairs[0][0], num_inference_steps=1, guidance_scale=guidance_scale, output_type="pil", **size)  # warm-up
    for prompt, seed in tqdm(pairs, desc="generating", disable=not progress, leave=False):
        generator = torch.Generator(device="cpu").manual_seed(seed)  # CPU noise: same on every device
        synchronize(device)
        started = time.perf_counter()
        image = pipe(
            prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            generator=generator, **size,
        ).images[0]
        synchronize(device)
        result.latencies_s.append(time.perf_counter() - started)
        result.images.append(image)
        result.prompts.append(prompt)
        result.seeds.append(seed)
    return result


def save_images(result: GenerationResult, out_dir: Path, indices: list[int] | None = None) -> list[Path]:
    """PNG files named by their place in the whole set (``indices``; default 0, 1, …)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    indices = indices if indices is not None else list(range(len(result.images)))
    for index, image, prompt, seed in zip(indices, result.images, result.prompts, result.seeds):
        path = out_dir / image_name(index, prompt, seed)
        atomic.save_image(path, image)
        paths.append(path)
    result.paths = paths
    return paths


def image_name(index: int, prompt: str, seed: int) -> str:
    return f"{index:03d}-{slug(prompt)}-seed{seed}.png"


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"
