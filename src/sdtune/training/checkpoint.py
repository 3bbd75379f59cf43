"""Resumable checkpoints, written atomically (temp folder + rename) and rotated.

A checkpoint holds only what changes during training: the trainable tensors, the optimizer,
LR-scheduler, EMA and grad-scaler states, the step and the loss history — as safetensors + JSON,
never pickles. The data order
and the noise are pure functions of (seed, step), so nothing else is needed to resume exactly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdtune.errors import UserError
from sdtune.util import atomic

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing or does not fit the run being resumed."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    total_limit: int | None,
) -> Path:
    """Write checkpoint-<step> atomically; once it exists, delete all but the newest ``total_limit``
    (None: delete nothing). A failed write leaves every earlier checkpoint as it was."""
    final = checkpoint_path(run_dir, step)
    structure, state_tensors = split_tensors(training_state)
    with atomic.replacing(final, folder=True) as temporary:  # the folder appears complete, or not at all
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in trainable.items()},
                  temporary / "trainable.safetensors", metadata={"format": "pt"})
        save_file(state_tensors, temporary / "training_state.safetensors", metadata={"format": "pt"})
        (temporary / "training_state.json").write_text(json.dumps(structure))
        (temporary / "meta.json").write_text(json.dumps({"step": step, "tensors": len(trainable)}, indent=2))
    if total_limit is not None:
        for old in checkpoint_dirs(run_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint after ``step``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"checkpoint-{step:08d}"


def resolve_resume(run_dir: Path, resume: str | bool | None) -> Path | None:
    """``True``/"latest" → the newest checkpoint of the run (None if there is none); a path → it."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(str(resume)).expanduser()
    if not (path / "trainable.safetensors").exists():
        raise CheckpointError(f"--resume {str(path)!r}: not a checkpoint folder (no trainable.safetensors)")
    return path


def read_saved_state(path: Path) -> dict[str, Any]:
    """A checkpoint's loop state (:class:`sdtune.training.state.TrainState`'s ``state_dict``: plain
    JSON), without reading its tensors."""
    try:
        return json.loads((Path(path) / "training_state.json").read_text())["state"]
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({error}); resume from another one with --resume PATH") from None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    trainable = load_file(Path(path) / "trainable.safetensors")
    structure = json.loads((Path(path) / "training_state.json").read_text())
    state = join_tensors(structure, load_file(Path(path) / "training_state.safetensors"))
    return trainable, state


_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INT_KEYS = "__int_keys__"


def split_tensors(value: Any, prefix: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tensors, numbers) into JSON and a flat tensor dict.

    Optimizer, scheduler and EMA states are saved this way instead of pickles, so a checkpoint is
    only safetensors + JSON and loading one never runs code.
    """
    tensors: dict[str, torch.Tensor] = {}
    # One tensor held under several keys (bitsandbytes' 8-bit AdamW keeps one quantisation map per
    # optimiser, referenced from every parameter's state) is written once and loaded back shared;
    # distinct tensors that share storage are written as copies (safetensors refuses shared storage).
    first_key: dict[int, str] = {}
    storages: set[int] = set()

    def walk(item: Any, key: str) -> Any:
        if isinstance(item, torch.Tensor):
            if id(item) in first_key:
                return {_TENSOR: first_key[id(item)]}
            tensor = item.detach().contiguous().cpu()
            pointer = tensor.untyped_storage().data_ptr()
            tensors[key] = tensor.clone() if pointer in storages and tensor.numel() else tensor
            storages.add(pointer)
            first_key[id(item)] = key
            return {_TENSOR: key}
        if isinstance(item, dict):
            int_keys = [k for k in item if isinstance(k, int)]
            converted = {str(k): walk(v, f"{key}.{k}") for k, v in item.items()}
            if int_keys:
                converted[_INT_KEYS] = [str(k) for k in int_keys]
            return converted
        if isinstance(item, (list, tuple)):
            walked = [walk(v, f"{key}.{i}") for i, v in enumerate(item)]
            return {_TUPLE: walked} if isinstance(item, tuple) else walked
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        raise TypeError(f"cannot checkpoint a value of type {type(item).__name__} at {key}")

    return walk(value, prefix), tensors


def join_tensors(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(structure, dict):
        if _TENSOR in structure:
            return tensors[structure[_TENSOR]]
        if _TUPLE in structure:
            return tuple(join_tensors(v, tensors) for v in structure[_TUPLE])
        int_keys = set(structure.get(_INT_KEYS, []))
        return {
            (int(k) if k in int_keys else k): join_tensors(v, tensors)
            for k, v in structure.items()
            if k != _INT_KEYS
        }
    if isinstance(structure, list):
        return [join_tensors(v, tensors) for v in structure]
    return structure


def check_trainable_names(parameters: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    """A checkpoint's trained tensors must be exactly this run's, by name."""
    missing = sorted(set(parameters) - set(saved))
    extra = sorted(set(saved) - set(parameters))
    if missing or extra:
        example = (missing or extra)[0]
        raise CheckpointError(
            f"checkpoint does not match this technique: {len(missing)} trainable tensors missing and "
            f"{len(extra)} unexpected (e.g. {example}); resume with the same experiment and technique"
        )


def restore_parameters(parameters: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the live parameters, checking the names match exactly."""
    check_trainable_names(parameters, saved)
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(saved[name].to(parameter.device, parameter.dtype))
