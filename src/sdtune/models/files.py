"""Reading model files: a pipeline's JSON files (local folder or hub repo), a separate VAE, and the
one-line error every loading failure becomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdtune.errors import UserError, first_line

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(UserError, RuntimeError):
    """The base model could not be loaded; the message says what was tried and how to fix it."""


def read_model_json(path: str, file: str, revision: str | None = None) -> dict[str, Any] | None:
    """A JSON file of a local pipeline folder or hub repo (None when it cannot be read)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return json.loads((folder / file).read_text()) if (folder / file).exists() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, file, revision=revision)).read_text())
    except Exception:
        return None


def load_vae(path: str, dtype: torch.dtype) -> Any:
    """A separately distributed VAE (e.g. the fp16-fixed SDXL VAE): a folder, hub id or single file."""
    from diffusers import AutoencoderKL

    with load_errors(path):
        if Path(path).expanduser().is_file():
            return AutoencoderKL.from_single_file(path)
        folder = Path(path).expanduser()
        subfolder = "vae" if (folder / "vae" / "config.json").exists() else None
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder)


class load_errors:
    """Turn the many exceptions of hub/local loading into one clear line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, (OSError, ValueError, EnvironmentError, KeyError)):
            return False
        local = Path(self.path).expanduser().exists()
        fix = (
            "check that the folder is a diffusers pipeline (model_index.json and one folder per component)"
            if local
            else "the hub may be unreachable: download the model and give its local folder, or a single "
            ".safetensors file with model.single_file_config"
        )
        raise ModelLoadError(f"could not load model {self.path!r}: {first_line(exc, 300)}; {fix}") from exc
