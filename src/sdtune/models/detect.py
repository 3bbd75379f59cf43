"""Which family a model belongs to (``model.family: auto``): from its model_index.json (a folder or a
hub repo), or for a single file from its config folder or the checkpoint's keys."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from sdtune.config import ModelConfig
from sdtune.models.base import FAMILIES, Model
from sdtune.models.files import ModelLoadError, read_model_json


def model_class(config: ModelConfig) -> type[Model]:
    """The family named in the config, or the one detected from the model (``family: auto``)."""
    return FAMILIES.get(config.family if config.family != "auto" else detect_family_name(config))


def detect_family_name(config: ModelConfig) -> str:
    """The registered family of a model; a clear error when it cannot tell."""
    path = Path(config.path).expanduser()
    if path.is_file():
        if config.single_file_config:
            return _family_of_index(_read_index(config.single_file_config), config.single_file_config)
        return _family_of_single_file(path)
    return _family_of_index(_read_index(config.path, config.revision), config.path, config.revision)


def _read_index(path: str, revision: str | None = None) -> dict[str, Any]:
    index = read_model_json(path, "model_index.json", revision)
    if index is None and Path(path).expanduser().is_dir():
        raise ModelLoadError(f"model {path!r}: no model_index.json; give a diffusers pipeline folder")
    if index is None:
        raise ModelLoadError(
            f"model {path!r}: cannot read its model_index.json (offline, or not a pipeline repo), so its "
            f"family cannot be detected; set model.family to one of: {', '.join(FAMILIES.names())}"
        )
    return index


def _family_of_index(index: dict[str, Any], where: str, revision: str | None = None) -> str:
    pipeline = index.get("_class_name")
    for name in FAMILIES:
        family = FAMILIES.get(name)
        if pipeline in family.detects_pipelines and family.matches_index(where, revision):
            return name
    raise ModelLoadError(
        f"model {where!r} is a {pipeline}, which no registered family trains; set model.family to one of: "
        f"{', '.join(FAMILIES.names())}"
    )


def _family_of_single_file(path: Path) -> str:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"model {str(path)!r}: the family of a .ckpt file is not detected; set model.family "
            f"({', '.join(FAMILIES.names())}) or model.single_file_config"
        )
    try:
        model_type = infer_diffusers_model_type(_LazySafetensors(path))
    except Exception as error:
        raise ModelLoadError(f"model {str(path)!r}: not a readable checkpoint ({error}); set model.family") from None
    for name in FAMILIES:
        if model_type in FAMILIES.get(name).single_file_types:
            return name
    raise ModelLoadError(
        f"model {str(path)!r} looks like a {model_type!r} checkpoint, which no registered family trains; set "
        f"model.family to one of: {', '.join(FAMILIES.names())}"
    )


class _LazySafetensors(Mapping):
    """A safetensors file as a mapping that reads a tensor only when asked (for key-based detection)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
