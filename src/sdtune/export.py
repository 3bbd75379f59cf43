"""``sdtune export``: a run with its weights folded in, as a diffusers pipeline folder (``--merged``)
or one checkpoint in the original layout for A1111/ComfyUI (``--single-file``)."""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune.config import ConfigError
from sdtune.formats.families import export_facts
from sdtune.formats.single_file import save_single_file
from sdtune.generation import finished_run, load_run_pipeline
from sdtune.records import read_record
from sdtune.util import atomic
from sdtune.util.paths import OutputPathError, check_output_file, check_writable_folder, is_within

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # None: the weights' own (exact)


def check_export_targets(
    run_dir: str | Path,
    merged_out: str | Path | None = None,
    single_file: str | Path | None = None,
    overwrite: bool = False,
    precision: str = "fp32",
) -> None:
    """Everything an export can check before it loads a model, for both targets at once (so that
    the first is not written when the second cannot be): the run (finished, of a known technique,
    its base model there and of its family), each target writable, replaced only with
    ``overwrite`` and never the run itself, another run, or a folder that is not an export."""
    run_dir = Path(run_dir)
    record, _, technique = finished_run(run_dir)
    if merged_out is not None:
        _check_merged_target(run_dir, Path(merged_out), overwrite)
    if single_file is not None:
        _check_single_file_target(run_dir, Path(single_file), overwrite, precision, technique)
        export_facts(record["model"]["family"])  # (a family without single-file names: one line)


def _check_merged_target(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if is_within(run_dir, out_dir):
        raise OutputPathError(f"--out: {str(out_dir)!r} holds the run {str(run_dir)!r} itself; write the export elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"--out: {str(out_dir)!r} is a file; give a folder for the pipeline")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputPathError(f"--out: {str(out_dir)!r} is not empty; choose another --out or pass --overwrite")
        if read_record(out_dir) is not None:
            raise OutputPathError(f"--out: {str(out_dir)!r} is an sdtune run folder; --overwrite replaces only an earlier export")
        if not (out_dir / "model_index.json").is_file():
            raise OutputPathError(
                f"--out: {str(out_dir)!r} holds files that are not a diffusers pipeline; --overwrite replaces only an "
                "earlier export (a folder with model_index.json): choose an empty or new folder"
            )
    check_writable_folder(out_dir.parent, "--out")  # (the new folder is written beside it, then renamed)


def _check_single_file_target(run_dir: Path, out_file: Path, overwrite: bool, precision: str, technique: type) -> None:
    if out_file.suffix != ".safetensors":
        raise ConfigError(f"--single-file: {str(out_file)!r} does not end in .safetensors; name the file OUT.safetensors")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision: {precision!r} is not allowed; choose one of: {', '.join(PRECISIONS)}")
    if technique.single_file_refused:
        raise ConfigError(f"--single-file: {technique.single_file_refused}")
    if out_file.exists() and is_within(out_file, run_dir):
        raise OutputPathError(f"--single-file: {str(out_file)!r} is a file of the run itself; write the export elsewhere")
    check_output_file(out_file, "--single-file", overwrite)


def export_merged(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """``sdtune export --merged``: the base model with the run's weights folded in, as a full pipeline."""
    out_dir = Path(out_dir)
    check_export_targets(run_dir, merged_out=out_dir, overwrite=overwrite)
    pipe, _ = load_run_pipeline(run_dir, fuse=True, device=torch.device("cpu"))
    with atomic.replacing(out_dir, folder=True) as folder:  # the old folder stays until the new one is whole
        pipe.save_pretrained(folder, safe_serialization=True)
    return out_dir


def export_single_file(
    run_dir: str | Path, out_file: str | Path, overwrite: bool = False, precision: str = "fp32"
) -> Path:
    """``sdtune export --single-file``: the run's model (adapters merged) as one checkpoint in the
    original layout (CompVis LDM for SD1/2, SGM for SDXL, Stability's for SD3; see sdtune.formats.single_file),
    which A1111, ComfyUI and diffusers' ``from_single_file`` load."""
    out_file = Path(out_file)
    check_export_targets(run_dir, single_file=out_file, overwrite=overwrite, precision=precision)
    pipe, record = load_run_pipeline(run_dir, fuse=True, device=torch.device("cpu"))
    facts = export_facts(record["model"]["family"])  # (from the record: SD1 and SD2 share a pipeline class)
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": facts.modelspec_architecture,
        "modelspec.title": Path(run_dir).name,
        "modelspec.prediction_type": str(record.get("prediction_type") or "flow"),
        "sdtune.technique": record["technique"]["kind"],
    }
    return save_single_file(pipe.components, facts.single_file_layout, out_file, metadata, PRECISIONS[precision])
