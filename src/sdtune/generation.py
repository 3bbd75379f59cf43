"""A finished run (or the base model) as a pipeline, and ``sdtune generate``.

Model load time and per-image latency are measured separately (:mod:`sdtune.models.sampling`: a
one-step warm-up run, not saved and not timed, comes first so lazy initialisation does not count).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from sdtune.config import ConfigError, ModelConfig, QuantizeConfig, build
from sdtune.errors import UserError
from sdtune.models import model_class
from sdtune.models.quantize import quantization_of
from sdtune.models.sampling import (
    GenerationArgumentError,
    GenerationResult,
    generate_images,
    save_images,
    scheduler_class,
    set_scheduler,
)
from sdtune.records import read_record
from sdtune.techniques import TECHNIQUES
from sdtune.util.device import default_device


class RunNotFoundError(UserError, FileNotFoundError):
    """The folder is not a finished sdtune run."""


def load_run_pipeline(
    run_dir: str | Path, fuse: bool = True, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
    full_precision_base: bool = False, dequantize_base: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """The pipeline of a finished run: its own folder (full) or base model + its weights.

    A run trained on a quantised base loads its base quantised the same way (its adapter then stays
    unfused: folding it into 4/8-bit weights would round it away), unless ``full_precision_base``;
    ``dequantize_base`` turns the quantised layers into plain ones holding exactly the weights they
    computed with before the adapter loads (``export``: the trained function, in plain weights)."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if record is None or record.get("kind") != "train":
        raise RunNotFoundError(f"{run_dir} is not an sdtune run folder (no record.json); give OUTPUT/<technique>")
    if record.get("status") != "finished":
        raise RunNotFoundError(f"{run_dir}: the run is {record.get('status')}; finish it with `sdtune train --resume`")
    technique = TECHNIQUES.get(record["technique"]["kind"])
    model_config = run_base_config(record, full_precision_base)
    family = model_class(model_config)
    device = device or default_device()
    if technique.own_pipeline(run_dir):
        pipe = family.load_pipeline(str(run_dir), dtype)
    else:
        pipe = load_base_pipeline(model_config, dtype, device)
        if dequantize_base:
            family.dequantize(pipe, dtype)
        pipe = technique.load_into(pipe, run_dir, record["technique"]["options"])
        if fuse and not any(quantization_of(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module)):
            pipe = technique.merge(pipe)
    trained_for = record.get("prediction_type")
    if (record.get("objective") or {}).get("name", "ddpm") == "ddpm" and trained_for and trained_for != pipe.scheduler.config.get("prediction_type"):
        pipe.scheduler.register_to_config(prediction_type=record["prediction_type"])  # trained with an override
    return pipe.to(device), record


def run_base_config(record: dict[str, Any], full_precision_base: bool = False) -> ModelConfig:
    """The base model of a run's record, quantised as the run trained on it (its ``quantization``)
    unless ``full_precision_base``."""
    model_config = build(ModelConfig, record["config"]["model"], "record config.model")
    quantization = record.get("quantization") or {}
    spec = QuantizeConfig(quantization.get("denoiser"), quantization.get("text_encoders"))
    return dataclasses.replace(model_config, quantize=QuantizeConfig() if full_precision_base else spec)


def base_description(model_config: ModelConfig) -> dict[str, Any] | None:
    """How a base model was loaded, for the records of what sampled it: its quantisation, or None
    for full precision."""
    spec = model_config.quantize
    return {"denoiser": spec.denoiser, "text_encoders": spec.text_encoders} if spec.active else None


def load_base_pipeline(
    model_config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Any:
    """The base model as a pipeline (quantised as ``model_config.quantize`` says, on ``device``)."""
    return model_class(model_config).load_pipeline(model_config.path, dtype, model_config, device)


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
    full_precision_base: bool = False,
) -> GenerationResult:
    """``sdtune generate``: load a run, write ``num_images`` PNGs per prompt (seeds seed, seed+1, …);
    ``width``/``height`` (e.g. a bucket of the run's record) override the square ``resolution``; a run
    trained on a quantised base samples on that base unless ``full_precision_base``."""
    _check_arguments(prompts, num_images, steps, guidance)
    for flag, value in (("--width", width), ("--height", height), ("--resolution", resolution)):
        if value is not None and (value <= 0 or value % 8):
            raise ConfigError(f"{flag}: {value} is not a positive multiple of 8 (the VAE downsamples by 8)")
    if scheduler:
        scheduler_class(scheduler)  # a bad name fails before the model loads
    started = time.perf_counter()
    pipe, record = load_run_pipeline(run_dir, fuse=fuse, full_precision_base=full_precision_base)
    set_scheduler(pipe, scheduler)
    load_time = time.perf_counter() - started
    side = resolution or record["config"]["data"]["resolution"]
    size = (width or side, height or side) if width or height else side
    result = generate_images(pipe, prompts, list(range(seed, seed + num_images)), steps, guidance, size, progress)
    result.load_time_s = load_time
    result.base_quantization = base_description(run_base_config(record, full_precision_base))
    save_images(result, Path(out_dir) if out_dir else Path(run_dir) / "samples")
    return result


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


