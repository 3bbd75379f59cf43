"""A finished run (or the base model) as a pipeline, and ``sdtune generate``.

Model load time and per-image latency are measured separately (:mod:`sdtune.models.sampling`: a
one-step warm-up run, not saved and not timed, comes first so lazy initialisation does not count).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sdtune.config import ConfigError, ModelConfig, build, looks_like_local_path
from sdtune.errors import UserError, first_line
from sdtune.models import ModelLoadError, detect_family_name, model_class
from sdtune.models.sampling import (
    GenerationArgumentError,
    GenerationResult,
    generate_images,
    save_images,
    scheduler_class,
    set_scheduler,
)
from sdtune.records import read_record
from sdtune.techniques import TECHNIQUES, Technique, WeightsDoNotFit
from sdtune.util.device import default_device
from sdtune.util.paths import check_writable_folder


class RunNotFoundError(UserError, FileNotFoundError):
    """The folder is not a finished sdtune run."""


class RunMismatchError(UserError, ValueError):
    """A run's files do not fit the base model they load into (another family, another model)."""


# how torch, diffusers and peft say that a tensor of one model does not fit another's layer
SHAPE_MISMATCH_WORDS = ("size mismatch", "shape mismatch", "must match the size", "cannot be broadcast")


def finished_run(run_dir: str | Path) -> tuple[dict[str, Any], ModelConfig, type[Technique]]:
    """A finished run's record, its base model's config and its technique plug-in, each checked
    before anything loads: the record is sdtune's and finished, its kind is a technique of this
    sdtune, and the base model its files go onto (not a full run's: that folder is its own
    pipeline) is still where it was and still of the family the run was trained on."""
    run_dir = Path(run_dir)
    record = read_record(run_dir) if run_dir.is_dir() else None
    if record is None or record.get("kind") != "train":
        raise RunNotFoundError(f"{run_dir} is not an sdtune run folder (no record.json); give OUTPUT/<technique>")
    if record.get("status") != "finished":
        raise RunNotFoundError(f"{run_dir}: the run is {record.get('status')}; finish it with `sdtune train --resume`")
    kind = (record.get("technique") or {}).get("kind")
    if kind not in TECHNIQUES:
        raise RunMismatchError(
            f"{run_dir}: technique kind {kind!r} of its record is not one this sdtune knows ({', '.join(TECHNIQUES.names())}); "
            "use the sdtune version that trained it (record.json: versions.sdtune)"
        )
    technique = TECHNIQUES.get(kind)
    return record, recorded_model(record, run_dir, needed=not technique.own_pipeline(run_dir)), technique


def recorded_model(record: dict[str, Any], run_dir: Path, needed: bool = True) -> ModelConfig:
    """The base model a run was trained on; when the run ``needed`` it (its files go onto it), checked
    to be there and of the family the record names."""
    where = f"{run_dir / 'record.json'}: config.model"
    model_config = build(ModelConfig, dict((record.get("config") or {}).get("model") or {}), where)
    if not needed:
        return model_config
    if looks_like_local_path(model_config.path) and not Path(model_config.path).expanduser().exists():
        raise RunMismatchError(
            f"{run_dir}: its base model {model_config.path!r} (record.json: config.model.path) is not there any more; "
            "put the model back at that path, or use the run where its base model is"
        )
    trained_on = (record.get("model") or {}).get("family") or model_config.family
    try:
        now = detect_family_name(model_config)
    except ModelLoadError:
        return model_config  # (undetectable here, e.g. a hub id offline: the load says what is wrong)
    if trained_on not in ("auto", now):
        raise RunMismatchError(
            f"{run_dir} was trained on a model of family {trained_on}, but its base model {model_config.path!r} is "
            f"now of family {now}; put the run's own base model back at that path"
        )
    return model_config


def load_run_pipeline(
    run_dir: str | Path, fuse: bool = True, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, dict[str, Any]]:
    """The pipeline of a finished run: its own folder (full) or base model + its weights."""
    run_dir = Path(run_dir)
    record, model_config, technique = finished_run(run_dir)
    family = model_class(model_config)
    if technique.own_pipeline(run_dir):
        pipe = family.load_pipeline(str(run_dir), dtype)
    else:
        pipe = load_base_pipeline(model_config, dtype)
        with files_that_do_not_fit(run_dir, model_config):
            pipe = technique.load_into(pipe, run_dir, record["technique"]["options"])
        if fuse:
            pipe = technique.merge(pipe)
    trained_for = record.get("prediction_type")
    if (record.get("objective") or {}).get("name", "ddpm") == "ddpm" and trained_for and trained_for != pipe.scheduler.config.get("prediction_type"):
        pipe.scheduler.register_to_config(prediction_type=record["prediction_type"])  # trained with an override
    return pipe.to(device or default_device()), record


@contextlib.contextmanager
def files_that_do_not_fit(run_dir: Path, model_config: ModelConfig) -> Iterator[None]:
    """A run's weight files that do not fit its base model (files of another model copied into the
    folder, a base model replaced) become one line naming both, not a wall of size mismatches."""
    held = _HeldLogRecords()  # what the loaders say on the way (peft's warnings, diffusers' errors)
    try:
        with warnings.catch_warnings(record=True) as caught, held:
            warnings.simplefilter("always")
            yield
    except (RuntimeError, ValueError) as error:
        lines = str(error).splitlines()
        mismatch = next((line.strip() for line in lines if any(word in line for word in SHAPE_MISMATCH_WORDS)), None)
        if mismatch is None and not isinstance(error, WeightsDoNotFit):
            held.replay()
            raise
        raise RunMismatchError(
            f"{run_dir}: its weight files do not fit the base model {model_config.path!r} ({mismatch or first_line(error)}); "
            "were they trained on another model? Put the run's own files back, or train it again"
        ) from error
    held.replay()  # a load that worked: its notices, as they would have been shown
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


class _HeldLogRecords(logging.Handler):
    """Holds what the diffusers and peft loggers emit inside the block (a failed load is said in one
    line instead); :meth:`replay` hands it to their own handlers afterwards."""

    LOGGERS = ("diffusers", "peft")

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _HeldLogRecords:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [self], False
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, (handlers, propagate) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate

    def replay(self) -> None:
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        self.records.clear()


def load_base_pipeline(model_config: ModelConfig, dtype: torch.dtype = torch.float32) -> Any:
    return model_class(model_config).load_pipeline(model_config.path, dtype, model_config)


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
    finished_run(run_dir)  # (the run, its base model and family, before anything loads)
    out = check_writable_folder(Path(out_dir) if out_dir else Path(run_dir) / "samples", "--out")
    started = time.perf_counter()
    pipe, record = load_run_pipeline(run_dir, fuse=fuse)
    set_scheduler(pipe, scheduler)
    load_time = time.perf_counter() - started
    side = resolution or record["config"]["data"]["resolution"]
    size = (width or side, height or side) if width or height else side
    result = generate_images(pipe, prompts, list(range(seed, seed + num_images)), steps, guidance, size, progress)
    result.load_time_s = load_time
    save_images(result, out)
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


