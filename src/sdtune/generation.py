"""Load a trained technique (or the base model) into a pipeline and generate images.

Model load time and per-image latency are measured separately; a one-step warm-up run (not
saved, not timed) comes first so lazy initialisation does not count as latency.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtune.config.sections import ConfigError, ModelConfig
from sdtune.errors import UserError
from sdtune.models import FAMILIES, ModelFamily, family_for
from sdtune.records import read_record
from sdtune.techniques import TECHNIQUES


class RunNotFoundError(UserError, FileNotFoundError):
    """The folder is not a finished sdtune run."""


@dataclass
class GenerationResult:
    images: list[Any]  # PIL images, in order of (prompt, seed)
    prompts: list[str]
    seeds: list[int]
    paths: list[Path] = field(default_factory=list)
    load_time_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # per image, warm-up excluded


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_run_pipeline(
    run_dir: str | Path, fuse: bool = True, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, dict[str, Any]]:
    """The pipeline of a finished run: its own folder (full) or base model + its weights."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if record is None or record.get("kind") != "train":
        raise RunNotFoundError(f"{run_dir} is not an sdtune run folder (no record.json); give OUTPUT/<technique>")
    if record.get("status") != "finished":
        raise RunNotFoundError(f"{run_dir}: the run is {record.get('status')}; finish it with `sdtune train --resume`")
    technique = TECHNIQUES.get(record["technique"]["kind"])
    model_config = ModelConfig(**record["config"]["model"])
    family = family_for(model_config)
    if technique.own_pipeline(run_dir):
        pipe = family.load_pipeline(str(run_dir), dtype)
    else:
        pipe = load_base_pipeline(model_config, dtype)
        pipe = technique.load_into(pipe, run_dir, record["technique"]["options"])
        if fuse:
            pipe = technique.merge(pipe)
    trained_for = record.get("prediction_type")
    if (record.get("objective") or {}).get("name", "ddpm") == "ddpm" and trained_for and trained_for != pipe.scheduler.config.get("prediction_type"):
        pipe.scheduler.register_to_config(prediction_type=record["prediction_type"])  # trained with an override
    return pipe.to(device or default_device()), record


def export_merged(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """``sdtune export --merged``: the base model with the run's weights folded in, as a full pipeline."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise RunNotFoundError(f"{out_dir} is not empty; choose another --out or pass --overwrite")
    pipe, _ = load_run_pipeline(run_dir, fuse=True, device=torch.device("cpu"))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # None: the weights' own (exact)


def export_single_file(
    run_dir: str | Path, out_file: str | Path, overwrite: bool = False, precision: str = "fp32"
) -> Path:
    """``sdtune export --single-file``: the run's model (adapters merged) as one checkpoint in the
    original layout (CompVis LDM for SD1/2, SGM for SDXL, Stability's for SD3; see sdtune.formats.single_file),
    which A1111, ComfyUI and diffusers' ``from_single_file`` load."""
    from sdtune.formats.single_file import save_single_file

    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise ConfigError(f"--single-file: {str(out_file)!r} does not end in .safetensors; name the file OUT.safetensors")
    if out_file.exists() and not overwrite:
        raise ConfigError(f"--single-file: {out_file} exists; choose another file or pass --overwrite")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision: {precision!r} is not allowed; choose one of: {', '.join(PRECISIONS)}")
    kind = ((read_record(Path(run_dir)) or {}).get("technique") or {}).get("kind")
    if kind in TECHNIQUES and TECHNIQUES.get(kind).single_file_refused:
        raise ConfigError(f"--single-file: {TECHNIQUES.get(kind).single_file_refused}")
    pipe, record = load_run_pipeline(run_dir, fuse=True, device=torch.device("cpu"))
    family = FAMILIES.get(record["model"]["family"])()  # (SD1 and SD2 share a pipeline class)
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.title": Path(run_dir).name,
        "modelspec.prediction_type": str(record.get("prediction_type") or "flow"),
        "sdtune.technique": record["technique"]["kind"],
    }
    return save_single_file(pipe.components, family.single_file_layout, out_file, metadata, PRECISIONS[precision])


def load_base_pipeline(model_config: ModelConfig, dtype: torch.dtype = torch.float32) -> Any:
    return family_for(model_config).load_pipeline(model_config.path, dtype, model_config)


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The registered family whose pipeline class ``pipe`` is."""
    for name in FAMILIES:
        if FAMILIES.get(name).pipeline_class_name == type(pipe).__name__:
            return FAMILIES.get(name)()
    raise ValueError(f"{type(pipe).__name__} is not the pipeline of a registered model family")


def denoiser_of(pipe: Any) -> torch.nn.Module:
    return getattr(pipe, family_of_pipeline(pipe).denoiser)


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
    size.update(family_of_pipeline(pipe).generation_kwargs)  # sample as the model was trained (SD3: T5 length)
    pairs = pairs if pairs is not None else [(prompt, seed) for prompt in prompts for seed in seeds]
    result = GenerationResult(images=[], prompts=[], seeds=[])
    if not pairs:
        return result
    pipe(pairs[0][0], num_inference_steps=1, guidance_scale=guidance_scale, output_type="pil", **size)  # warm-up
    for prompt, seed in tqdm(pairs, desc="generating", disable=not progress, leave=False):
        generator = torch.Generator(device="cpu").manual_seed(seed)  # CPU noise: same on every device
        _synchronize(device)
        started = time.perf_counter()
        image = pipe(
            prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            generator=generator, **size,
        ).images[0]
        _synchronize(device)
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
        image.save(path)
        paths.append(path)
    result.paths = paths
    return paths


def image_name(index: int, prompt: str, seed: int) -> str:
    return f"{index:03d}-{slug(prompt)}-seed{seed}.png"


def generate(
    run_dir: str | Path,
    prompts: list[str],
    num_images: int = 4,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    out_dir: str | Path | None = None,
    fuse: bool = True,
    scheduler: str | None = None,
    resolution: int | None = None,
    progress: bool = True,
    width: int | None = None,
    height: int | None = None,
) -> GenerationResult:
    """``sdtune generate``: load a run, write ``num_images`` PNGs per prompt (seeds seed, seed+1, …);
    ``width``/``height`` (e.g. a bucket of the run's record) override the square ``resolution``."""
    _check_arguments(prompts, num_images, steps, guidance)
    for flag, value in (("--width", width), ("--height", height), ("--resolution", resolution)):
        if value is not None and (value <= 0 or value % 8):
            raise ConfigError(f"{flag}: {value} is not a positive multiple of 8 (the VAE downsamples by 8)")
    if scheduler:
        scheduler_class(scheduler)  # a bad name fails before the model loads
    started = time.perf_counter()
    pipe, record = load_run_pipeline(run_dir, fuse=fuse)
    set_scheduler(pipe, scheduler)
    load_time = time.perf_counter() - started
    side = resolution or record["config"]["data"]["resolution"]
    size = (width or side, height or side) if width or height else side
    result = generate_images(pipe, prompts, list(range(seed, seed + num_images)), steps, guidance, size, progress)
    result.load_time_s = load_time
    save_images(result, Path(out_dir) if out_dir else Path(run_dir) / "samples")
    return result


class GenerationArgumentError(UserError, ValueError):
    """A bad argument of ``sdtune generate`` (the message names it and what is allowed)."""


def _check_arguments(prompts: list[str], num_images: int, steps: int, guidance: float) -> None:
    problems = [
        (not prompts or not all(p.strip() for p in prompts), f"--prompt {prompts!r}", "one or more non-empty prompts"),
        (num_images < 1, f"--num-images {num_images}", "1 or more"),
        (steps < 1, f"--steps {steps}", "1 or more inference steps"),
        (guidance < 0, f"--guidance {guidance}", "0 or more (7.5 is usual)"),
    ]
    for bad, given, allowed in problems:
        if bad:
            raise GenerationArgumentError(f"{given} is not allowed; expected {allowed}")


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
