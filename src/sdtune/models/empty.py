"""A family's model with every weight on the meta device, built from the model's configs alone.

``sdtune train --estimate`` (:mod:`sdtune.training.estimate`) counts what training would hold
before any weight is read: each component is built from its ``config.json`` under accelerate's
``init_empty_weights`` (parameters on the meta device: shapes and dtypes, no memory), the
tokenizers and the scheduler from their small files. Nothing but those files is read (from a hub
repo: downloaded, a few kB each).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sdtune.config import ConfigError, ModelConfig
from sdtune.models.base import Model
from sdtune.models.files import load_errors, read_model_json


def load_empty(family: type[Model], config: ModelConfig) -> Model:
    """``family``'s model at ``config.path`` with meta-device weights (see the module docstring). A
    separate ``model.vae`` has the family's VAE architecture (the fp16-fix VAE does), so the model's
    own VAE config stands for it."""
    source = config.path
    if Path(source).expanduser().is_file():
        if not config.single_file_config:
            raise ConfigError(
                f"--estimate: {source!r} is a single file; give model.single_file_config (a diffusers folder or hub id "
                "with its configs) so the model can be built without reading its weights"
            )
        source = config.single_file_config
    index = read_model_json(source, "model_index.json", config.revision)
    if index is None:
        raise ConfigError(f"--estimate: cannot read model_index.json of {source!r}; give a diffusers folder or hub id")
    dropped = set(family.text_encoder_kwargs(source, config))
    parts: dict[str, Any] = {}
    with load_errors(source):
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or name in dropped:
                continue
            if name in (family.denoiser_name, "vae", *family.text_encoder_names) or name.startswith("tokenizer") or name == "scheduler":
                parts[name] = _empty_part(source, name, entry[0], entry[1], config.revision)
    scheduler = parts.pop("scheduler")
    return family.from_pipeline(SimpleNamespace(components=parts, scheduler=scheduler), config.path)


def _empty_part(source: str, name: str, library: str, class_name: str, revision: str | None) -> Any:
    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(library), class_name)
    options = {"subfolder": name, **({"revision": revision} if revision else {})}
    if name.startswith("tokenizer") or name == "scheduler":
        return cls.from_pretrained(source, **options)
    if library == "transformers":
        from transformers import AutoConfig

        with init_empty_weights(include_buffers=True):  # (buffers too: SD3's position table)
            return cls(AutoConfig.from_pretrained(source, **options))
    with init_empty_weights(include_buffers=True):
        return cls.from_config(cls.load_config(source, **options))
