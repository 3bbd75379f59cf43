"""``sdtune anatomy``: the anatomy of a finished run folder, or of a LoRA/LyCORIS file against a base
model, as an :class:`sdtune.records.AnatomyRecord`."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from sdtune import records
from sdtune.anatomy.compute import anatomy_of_pairs, base_lookup, model_anatomy
from sdtune.anatomy.files import file_pairs
from sdtune.config import ModelConfig, looks_like_local_path
from sdtune.errors import UserError, first_line
from sdtune.formats.families import family_of_metadata
from sdtune.generation import finished_run, recorded_model
from sdtune.models import ModelLoadError, detect_family_name, model_class
from sdtune.util.paths import check_output_file

ANATOMY_FILE = "anatomy.json"


class AnatomySourceError(UserError, ValueError):
    """What ``sdtune anatomy`` was given is not a finished run folder or a .safetensors file (with a base)."""


def weight_anatomy(
    source: str | Path, base: str | None = None, out: str | Path | None = None, progress: bool = True
) -> tuple[records.AnatomyRecord, Path]:
    """``sdtune anatomy``: what a run (``source`` a finished run folder; base: its record's model unless
    ``base`` names another of the same family) or a LoRA/LyCORIS ``.safetensors`` file
    (kohya/ComfyUI/LyCORIS or diffusers naming; ``base`` required) changed in the base model's
    weights: per layer, per block and in total (see sdtune.anatomy). Writes the record to ``out``
    (default: ``RUN/anatomy.json``, or ``FILE.anatomy.json`` beside the file) and returns it with its
    path. Everything that can be checked before a model loads is (:func:`check_anatomy_source`)."""
    source = Path(source)
    path = check_anatomy_source(source, base, out)
    if source.is_dir():
        record = _run_anatomy(source, base, progress)
    else:
        record = _file_anatomy(source, str(base), progress)
    records.write_record(path, record)
    return record, path


def check_anatomy_source(source: Path, base: str | None, out: str | Path | None) -> Path:
    """The preflight of ``sdtune anatomy``: a finished run folder (its base model there and of its
    family, or ``base`` of that family) or a .safetensors file with a ``base`` it was made for, and an
    ``out`` that can be written; return the record's path."""
    if source.is_dir():
        record, config, _ = finished_run(source)
        trained_on = (record.get("model") or {}).get("family") or config.family
        if base:
            _check_base_family(ModelConfig(path=base), trained_on, f"--base {base!r}", f"{source} was trained")
        else:
            recorded_model(record, source, needed=True)
        default_out = source / ANATOMY_FILE
    elif source.is_file() and source.suffix == ".safetensors":
        if not base:
            raise AnatomySourceError(f"{source}: a weights file needs its base model; add --base MODEL (a folder, hub id or file)")
        _check_file_family(source, base)
        default_out = source.with_name(f"{source.stem}.anatomy.json")
    elif not source.exists():
        raise AnatomySourceError(f"{source} does not exist; give a run folder (OUTPUT/<technique>) or a .safetensors file")
    else:
        raise AnatomySourceError(
            f"{source} is neither a run folder (OUTPUT/<technique>) nor a .safetensors LoRA/LyCORIS file"
        )
    return check_output_file(default_out if out is None else out, "--out", overwrite=True)  # (a record we derive)


def _check_base_family(config: ModelConfig, family: str, where: str, what: str) -> None:
    if looks_like_local_path(config.path) and not Path(config.path).expanduser().exists():
        raise AnatomySourceError(f"{where} does not exist; give the base model's folder, hub id or single file")
    try:
        now = detect_family_name(config)
    except ModelLoadError:
        return  # (undetectable here, e.g. a hub id offline: the load says what is wrong)
    if family not in ("auto", now):
        raise AnatomySourceError(f"{what} on a model of family {family}, but {where} is of family {now}; "
                                 f"give a base model of family {family}")


def _check_file_family(source: Path, base: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt") as file:
            metadata = file.metadata()
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise AnatomySourceError(f"{source} is not a readable .safetensors file ({first_line(error)})") from None
    _check_base_family(ModelConfig(path=base), family_of_metadata(metadata) or "auto", f"--base {base!r}",
                       f"{source.name} was trained (its metadata says so)")


def _run_anatomy(run_dir: Path, base: str | None, progress: bool) -> records.AnatomyRecord:
    record, recorded, technique = finished_run(run_dir)
    config = dataclasses.replace(recorded, path=base) if base else recorded
    family = model_class(config)
    with torch.no_grad():
        before = family.load(config)
        after = technique.restore(family.load(config), run_dir, record["technique"]["options"])
        components = {name: after.components[name] for name in after.trainable_names()}
        anatomy = model_anatomy(components, base_lookup(lambda: before), family,
                                weights=_what_was_compared(technique.kind, record), progress=progress)
    return _record(run_dir, config.path, family.family, technique.kind, anatomy)


def _file_anatomy(path: Path, base: str, progress: bool) -> records.AnatomyRecord:
    config = ModelConfig(path=base)
    family = model_class(config)
    with torch.no_grad():
        model = family.load(config)
        components = {name: model.components[name] for name in model.trainable_names()}
        pairs, kind = file_pairs(path, components, family.family)
        anatomy = anatomy_of_pairs(pairs, components, family, weights=f"{path.name} ({kind}) applied to the base model", progress=progress)
    return _record(path, base, family.family, kind, anatomy)


def _what_was_compared(kind: str, record: dict[str, Any]) -> str:
    ema = (record.get("train") or {}).get("use_ema")
    if kind == "full":
        return "the saved weights (EMA weights)" if ema else "the saved weights"
    return "the saved weights, adapters merged through peft" + (" (EMA weights)" if ema else "")


def _record(source: Path, base: str, family: str, technique: str | None, anatomy: records.Anatomy) -> records.AnatomyRecord:
    return records.AnatomyRecord(
        source=str(source), base=str(base), family=family, technique=technique, anatomy=dataclasses.asdict(anatomy),
        versions=records.package_versions(), git_commit=records.git_commit(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
