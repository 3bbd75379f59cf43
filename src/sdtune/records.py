"""Run records: one self-describing JSON per run, written atomically, typed and versioned.

Three kinds, each a dataclass with a ``schema_version``: :class:`TrainRecord` (one training run,
``OUTPUT/<technique>/record.json`` and ``records/train-….json``), :class:`EvalRecord` (one
evaluated model, or one technique at one evaluated step: ``records/eval-….json``) and
:class:`TuningRecord` (the selection of ``sdtune tune``: ``OUTPUT/tuning.json``) and
:class:`AnatomyRecord` (``sdtune anatomy``: the weight change of a run or of a LoRA/LyCORIS file).
A train record carries two typed entries of its own: ``checks.trained`` (:class:`TrainedCheck`: did
the technique train what it claims) and ``anatomy`` (:class:`Anatomy`: what the weights' change is
made of, per layer, per block and in total). Every record is
written with :func:`write_record` and read with :func:`read_record` / :func:`load_records`, which
reject unknown kinds, unknown keys and newer schema versions with one line. Reports are built only
from these records, so they can be re-rendered without retraining. ``RUN/progress.json``
(:class:`RunProgress`) is not a record: where a run stands while it trains, for the live report.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from sdtune.errors import UserError
from sdtune.util import atomic

RECORD_FILE = "record.json"
PACKAGES = (
    "sdtune", "torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "safetensors", "bitsandbytes",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the sdtune source tree (with '+dirty' for local changes), if it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def device_description(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["total_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        info["name"] = cpu_name()
        info["torch_threads"] = torch.get_num_threads()
    return info


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name ("AMD EPYC 7B13"): Linux's /proc/cpuinfo, else what the platform says
    (on Linux ``platform.processor()`` is often empty, and ``machine()`` only says "x86_64")."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """CUDA: max allocated bytes since the last reset. CPU: the process's peak resident set size
    (ru_maxrss; a process-lifetime peak, so it includes earlier work in the same process)."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "kind": "cpu_peak_rss"}


def bytes_on_disk(root: Path, files: list[str]) -> int:
    return sum((root / f).stat().st_size for f in files if (root / f).is_file())


SCHEMA_VERSION = 2  # 1: records before the typed classes (no schema_version key; read as version 1)


class RecordError(UserError, ValueError):
    """A records file sdtune cannot read: the message names the file and the problem."""


@dataclass
class TrainRecord:
    """One training run: resolved config (the one the run used: its seed, overrides, detected
    family), seeds, versions, timing, memory, sizes, losses, and the evaluations during training
    (``evaluation``: one entry per evaluated step with its validation loss and image folder)."""

    status: str  # finished | interrupted | failed | missing
    technique: dict[str, Any]
    seeds: dict[str, int]
    config: dict[str, Any]  # a loadable experiment file (experiment_from_dict)
    experiment: str | None = None
    model: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    objective: dict[str, Any] | None = None
    prediction_type: str | None = None
    steps: dict[str, int] | None = None
    versions: dict[str, str | None] | None = None
    git_commit: str | None = None
    device: dict[str, Any] | None = None
    num_processes: int | None = None
    sharding: str | None = None  # fsdp2 | deepspeed | None (whole weights in each process)
    # the frozen components loaded quantised: {denoiser, text_encoders, backend, backend_version,
    # compute_dtype, components: {name: {type, linear_layers, quantized_share, weight_bytes, …}}}; None: none
    quantization: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    bytes_on_disk: int | None = None
    data: dict[str, Any] | None = None
    loss_history: list[dict[str, float]] = field(default_factory=list)
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)  # "trained": a TrainedCheck (finished runs)
    anatomy: dict[str, Any] | None = None  # an Anatomy of the saved weights (finished runs)
    # settings changed on resume that are safe to change (docs/resume.md): {step, key, before, after}
    changed_on_resume: list[dict[str, Any]] = field(default_factory=list)
    finished_at: str | None = None
    run_dir: str | None = None
    error: str | None = None  # failed/missing: the one-line reason
    traceback: str | None = None  # failed by a bug of ours: its traceback
    kind: str = "train"
    schema_version: int = SCHEMA_VERSION


@dataclass
class EvalRecord:
    """One evaluated model: the base model, a technique's final model (``step`` None), or a
    technique at one step of its training (``step`` N); its images, generation costs and metrics."""

    label: str  # "base" or the technique's name
    metrics: dict[str, dict[str, Any]]
    images: list[dict[str, Any]]  # {path (relative to the output folder), prompt, seed, in_domain}
    config: dict[str, Any]
    technique: dict[str, Any] | None = None
    train_seed: int | None = None
    step: int | None = None  # None: the finished model
    train_record: str | None = None
    model: str | None = None
    generation: dict[str, Any] | None = None
    base_sizes: dict[str, int] | None = None
    base_parameters: dict[str, int] | None = None
    references: dict[str, Any] | None = None  # which real images the metrics compared with
    versions: dict[str, str | None] | None = None
    git_commit: str | None = None
    created_at: str | None = None
    kind: str = "eval"
    schema_version: int = SCHEMA_VERSION


@dataclass
class TuningRecord:
    """The selection of ``sdtune tune``: per technique every trial (its learning rate, score, steps,
    status and record), the chosen learning rate, whether it sits at the edge of the range, and the
    tuning cost; the rule and the budget every technique shared; where the final runs are."""

    experiment: str
    status: str  # trials (running) | selected | finished
    tuning: dict[str, Any]  # the tuning section as resolved: rates per technique, steps, select_by, direction, seeds
    budget: dict[str, Any]  # trials per technique, steps and samples per trial, what is held equal, the split
    techniques: dict[str, dict[str, Any]]  # name → {trials, chosen_learning_rate, score, at_edge, shared_learning_rate, cost}
    fingerprint: str  # what may not change between runs into one output folder (a hash)
    config: dict[str, Any]  # the experiment as resolved (loadable)
    fingerprint_parts: dict[str, Any] = field(default_factory=dict)  # what the fingerprint hashes (to name a change)
    engine: str | None = None  # local | ray
    scheduler: str | None = None  # grid | asha
    finals: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm (shared, tuned) → {root (relative), learning_rates, evaluation}
    asha: dict[str, Any] | None = None  # scheduler asha: rungs, reduction factor, and the steps each trial ran
    versions: dict[str, str | None] | None = None
    git_commit: str | None = None
    created_at: str | None = None
    finished_at: str | None = None
    kind: str = "tuning"
    schema_version: int = SCHEMA_VERSION



@dataclass
class CheckFailure:
    """One claim a run did not keep: ``item`` (gradient, moved, frozen, component, adapter layer,
    magnitude, vector, partial, ema, resume), ``where`` (the tensor, layer or component), ``detail``."""

    item: str
    where: str
    detail: str


@dataclass
class TrainedCheck:
    """``checks.trained`` of a train record: did the technique train what it claims (see
    docs/anatomy.md). ``failures`` are :class:`CheckFailure` mappings; ``unreachable`` the trainable
    tensors the family's conditioning never reaches (named by the family, not held against the run);
    ``gradient_watch_steps`` the optimizer steps during which some gradient flag was still unset
    (None: gradients not observable, under DeepSpeed); ``digests`` how the frozen and trained tensors
    were fingerprinted (whole, or a fixed sample of each)."""

    passed: bool
    failures: list[dict[str, str]]
    checked: dict[str, int]
    unreachable: list[str]
    gradient_watch_steps: int | None
    digests: str
    time_s: float


@dataclass
class Anatomy:
    """``anatomy`` of a train record (and of an :class:`AnatomyRecord`): the weight change ΔW of
    every changed weight matrix (``layers``), grouped by where it lives (``blocks``: down/mid/up
    blocks, transformer depth, text encoders; ``kinds``: self-/cross-attention, feed-forward,
    convolution, …) and in ``total``. ``method`` states the tolerances, k and ε; ``weights`` what was
    compared; ``time_s`` how long it took (see sdtune.anatomy)."""

    method: dict[str, Any]
    weights: str
    total: dict[str, Any]
    blocks: dict[str, dict[str, Any]]
    kinds: dict[str, dict[str, Any]]
    layers: list[dict[str, Any]]
    time_s: float
    device: str


@dataclass
class AnatomyRecord:
    """``sdtune anatomy``: the anatomy of a run folder or of a LoRA/LyCORIS file against a base model."""

    source: str  # the run folder or the file
    base: str  # the base model it was compared with
    family: str
    technique: str | None  # the run's technique kind, or the file's ("lora", "loha", "lokr", "dora", "full")
    anatomy: dict[str, Any]  # an Anatomy
    versions: dict[str, str | None] | None = None
    git_commit: str | None = None
    created_at: str | None = None
    kind: str = "anatomy"
    schema_version: int = SCHEMA_VERSION


RECORD_CLASSES: dict[str, type] = {"train": TrainRecord, "eval": EvalRecord, "tuning": TuningRecord, "anatomy": AnatomyRecord}
Record = TrainRecord | EvalRecord | TuningRecord | AnatomyRecord
TUNING_FILE = "tuning.json"
NESTED = {  # entries whose shape is a dataclass of their own: (where in the record, class)
    "train": (("checks", "trained", TrainedCheck), ("anatomy", None, Anatomy)),
    "anatomy": (("anatomy", None, Anatomy),),
}


def trained_check(record: TrainRecord | dict[str, Any]) -> TrainedCheck | None:
    """The run's ``checks.trained`` as a :class:`TrainedCheck` (None: not checked, e.g. unfinished)."""
    checks = record.get("checks") if isinstance(record, dict) else record.checks
    entry = (checks or {}).get("trained")
    return TrainedCheck(**entry) if entry else None


def check_failed(record: TrainRecord | dict[str, Any]) -> bool:
    """True when the run was checked and did not train what it claims."""
    check = trained_check(record)
    return check is not None and not check.passed


def check_failure_line(record: TrainRecord | dict[str, Any]) -> str | None:
    """One line naming what a failed check found (the first tensors or layers); None when it passed."""
    check = trained_check(record)
    if check is None or check.passed:
        return None
    technique = (record.get("technique") if isinstance(record, dict) else record.technique) or {}
    where = [failure["where"] for failure in check.failures]
    shown = ", ".join(where[:3]) + (f" (+{len(where) - 3} more)" if len(where) > 3 else "")
    items = ", ".join(sorted({failure["item"] for failure in check.failures}))
    return f"{technique.get('name')}: did not train what it claims ({items}): {shown}"


def _check_nested(kind: str, data: dict[str, Any], where: str) -> None:
    for key, inner, cls in NESTED.get(kind, ()):
        value = data.get(key)
        if inner is not None:
            value = (value or {}).get(inner)
        if value is None:
            continue
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        missing = sorted(f.name for f in fields(cls) if f.name not in value)
        if unknown or missing:
            problem = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
            raise RecordError(f"{where}: {key}{'.' + inner if inner else ''}: {problem}; was it written by another tool?")


def record_from_dict(data: dict[str, Any], where: str = "record") -> Record:
    """The typed record of a mapping; unknown kinds, unknown keys and newer versions are errors."""
    kind = data.get("kind")
    if kind not in RECORD_CLASSES:
        raise RecordError(f"{where}: kind {kind!r} is not a record kind ({', '.join(RECORD_CLASSES)})")
    cls = RECORD_CLASSES[kind]
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RecordError(
            f"{where}: schema_version {version!r} is newer than this sdtune reads ({SCHEMA_VERSION}); upgrade sdtune"
        )
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecordError(f"{where}: unknown {kind} record key {unknown[0]!r}; was it written by another tool?")
    _check_nested(kind, data, where)
    try:
        return cls(**{**data, "schema_version": SCHEMA_VERSION})
    except TypeError as error:  # a required key is missing
        raise RecordError(f"{where}: not a complete {kind} record ({error})") from None


def write_record(path: Path, record: Record | dict[str, Any]) -> Record:
    """Write a record (typed, or a mapping checked by :func:`record_from_dict`) atomically."""
    typed = record if isinstance(record, (TrainRecord, EvalRecord, TuningRecord, AnatomyRecord)) else record_from_dict(record, str(path))
    atomic.write_json(Path(path), asdict(typed), default=_default)
    return typed


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's train record as a mapping (checked), or None when there is none."""
    path = Path(run_dir) / RECORD_FILE
    return asdict(read_record_file(path)) if path.exists() else None


def read_record_file(path: Path) -> Record:
    """One record file, typed."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise RecordError(f"{path}: not valid JSON ({error}); delete it and rerun to write it again") from None
    return record_from_dict(data, str(path))


def load_records(root: Path) -> tuple[list[TrainRecord], list[EvalRecord]]:
    """Every train and eval record of a comparison folder (``ROOT/records/*.json``): (train records,
    eval records); anatomy records there are read (so a broken one is reported) and left to their users.
    A tuning folder's selection is read by :func:`load_tuning`."""
    folder = Path(root) / "records"
    if not folder.is_dir():
        if (Path(root) / TUNING_FILE).exists():
            raise RecordError(f"{root} is the output of `sdtune tune`: its records are read with load_tuning")
        raise RecordError(f"{root} has no records/ folder; give the output folder of an `sdtune compare` run")
    paths = sorted(folder.glob("*.json"))
    loaded = [read_record_file(path) for path in paths]
    check_one_base_model(list(zip(paths, loaded)))
    return [r for r in loaded if isinstance(r, TrainRecord)], [r for r in loaded if isinstance(r, EvalRecord)]


def load_tuning(root: Path) -> TuningRecord | None:
    """The selection record of an ``sdtune tune`` output folder (``ROOT/tuning.json``), or None."""
    path = Path(root) / TUNING_FILE
    if not path.exists():
        return None
    record = read_record_file(path)
    if not isinstance(record, TuningRecord):
        raise RecordError(f"{path}: a {record.kind} record, not the selection of `sdtune tune`")
    return record


def check_one_base_model(loaded: list[tuple[Path, Record]]) -> None:
    """A comparison compares techniques on one base model: records of another model or family (copied
    in, or left by an earlier comparison in the same folder) would mix in numbers that do not compare."""
    first: tuple[Path, tuple[Any, Any]] | None = None
    for path, record in loaded:
        model = (record.config or {}).get("model") or {}
        base = (model.get("path"), model.get("family"))
        if base == (None, None):  # (a record that does not say: nothing to compare)
            continue
        if first is None:
            first = (path, base)
        elif base != first[1]:
            raise RecordError(
                f"{path.name} is of model {base[0]!r} ({base[1]}) but {first[0].name} of {first[1][0]!r} "
                f"({first[1][1]}): a report compares one base model; move the records of the other out of "
                f"{path.parent}"
            )


# ----------------------------------------------------------------------------------------------
# Progress: where a run is while it trains (the live report reads it; it is not a record)

PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class RunProgress:
    """A training run's last sync point: ``step`` of ``max_steps`` done, ``state`` running (or,
    written once at the end, finished / interrupted). ``RUN/progress.json``, rewritten atomically."""

    step: int
    max_steps: int
    state: str  # running | finished | interrupted
    updated_at: str | None = None  # UTC, ISO 8601 to the second


def write_progress(run_dir: Path, progress: RunProgress) -> None:
    stamped = RunProgress(progress.step, progress.max_steps, progress.state,
                          datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic.write_json(Path(run_dir) / PROGRESS_FILE, asdict(stamped))


def read_progress(run_dir: Path) -> RunProgress | None:
    """The run folder's progress, or None when there is none (or it is not one sdtune wrote)."""
    try:
        data = json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
        return RunProgress(**data)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, TypeError):
        return None


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
