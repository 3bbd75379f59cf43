"""``sdtune anatomy``: the anatomy of a finished run folder, or of a LoRA/LyCORIS file against a base
model, as an :class:`sdtune.records.AnatomyRecord`."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from sdtune import records
from sdtune.anatomy.compute import anatomy_of_pairs, base_lookup, model_anatomy
from sdtune.anatomy.files import file_pairs
from sdtune.config import ModelConfig
from sdtune.errors import UserError
from sdtune.models import model_class
from sdtune.techniques import TECHNIQUES

ANATOMY_FILE = "anatomy.json"


class AnatomySourceError(UserError, ValueError):
    """What ``sdtune anatomy`` was given is not a finished run folder or a .safetensors file (with a base)."""


def weight_anatomy(
    source: str | Path, base: str | None = None, out: str | Path | None = None, progress: bool = True
) -> tuple[records.AnatomyRecord, Path]:
    """``sdtune anatomy``: what a run (``source`` a finished run folder; base: its record's model unless
    ``base`` names another) or a LoRA/LyCORIS ``.safetensors`` file (kohya/ComfyUI/LyCORIS or
    diffusers naming; ``base`` required) changed in the base model's weights: per layer, per block and
    in total (see sdtune.anatomy). Writes the record to ``out`` (default: ``RUN/anatomy.json``, or
    ``FILE.anatomy.json`` beside the file) and returns it with its path."""
    source = Path(source)
    if source.is_dir():
        record, default_out = _run_anatomy(source, base, progress), source / ANATOMY_FILE
    elif source.is_file() and source.suffix == ".safetensors":
        if not base:
            raise AnatomySourceError(f"{source}: a weights file needs its base model; add --base MODEL (a folder, hub id or file)")
        record, default_out = _file_anatomy(source, base, progress), source.with_name(f"{source.stem}.anatomy.json")
    else:
        raise AnatomySourceError(
            f"{source} is neither a run folder (OUTPUT/<technique>) nor a .safetensors LoRA/LyCORIS file"
        )
    path = Path(out) if out else default_out
    records.write_record(path, record)
    return record, path


def _run_anatomy(run_dir: Path, base: str | None, progress: bool) -> records.AnatomyRecord:
    record = records.read_record(run_dir)
    if record is None or record.get("kind") != "train":
        raise AnatomySourceError(f"{run_dir} is not an sdtune run folder (no record.json); give OUTPUT/<technique>")
    if record.get("status") != "finished":
        raise AnatomySourceError(f"{run_dir}: the run is {record.get('status')}; finish it with `sdtune train --resume`")
    technique = TECHNIQUES.get(record["technique"]["kind"])
    config = ModelConfig(**{**record["config"]["model"], **({"path": base} if base else {})})
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
    from dataclasses import asdict

    return records.AnatomyRecord(
        source=str(source), base=str(base), family=family, technique=technique, anatomy=asdict(anatomy),
        versions=records.package_versions(), git_commit=records.git_commit(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
