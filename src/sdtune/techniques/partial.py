"""Partial fine-tuning: full-rank training of a chosen subset of the UNet, the rest frozen.

Saves only the trained tensors plus the list of their names; loading puts them onto the base
model. Presets name the common choices; a list of patterns (fnmatch, matched against parameter
names such as ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``) picks any.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.config import ConfigError, _build
from sdtune.techniques.base import (
    TECHNIQUES,
    Technique,
    TechniqueOptions,
    files_under,
    trainable_named_parameters,
)

if TYPE_CHECKING:
    from sdtune.models import ModelBundle

PRESETS = {
    "cross-attention": ["*.attn2.*"],  # text→image attention: what maps prompts onto images
    "attention": ["*.attn1.*", "*.attn2.*"],
    "up-blocks": ["up_blocks.*"],
}
WEIGHTS_FILE = "partial_weights.safetensors"
LIST_FILE = "trained_parameters.json"


@dataclass
class PartialOptions(TechniqueOptions):
    preset: str | None = "cross-attention"  # one of PRESETS, or null with `modules`
    modules: list[str] = field(default_factory=list)  # fnmatch patterns of UNet parameter names


@TECHNIQUES.register("partial")
class PartialFineTuning(Technique):
    kind = "partial"
    Options = PartialOptions

    @classmethod
    def validate_options(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        raw = dict(raw)
        if raw.get("modules") and "preset" not in raw:
            raw["preset"] = None  # explicit patterns replace the default preset
        options = _build(PartialOptions, raw, where)
        if options.preset is not None and options.preset not in PRESETS:
            raise ConfigError(
                f"{where}.preset: {options.preset!r} is not a preset; choose one of: "
                f"{', '.join(PRESETS)}, or give `modules: [patterns]`"
            )
        if options.preset is None and not options.modules:
            raise ConfigError(f"{where}: give a preset ({', '.join(PRESETS)}) or `modules: [patterns]`")
        from dataclasses import asdict

        return asdict(options)

    def patterns(self) -> list[str]:
        return PRESETS.get(self.options.preset or "", []) + list(self.options.modules)

    def make_trainable(self, bundle: ModelBundle) -> None:
        patterns = self.patterns()
        matched = 0
        for name, parameter in bundle.unet.named_parameters():
            if any(fnmatchcase(name, pattern) for pattern in patterns):
                parameter.requires_grad_(True)
                matched += 1
        if not matched:
            raise ConfigError(f"partial: the patterns {patterns} match no UNet parameter")
        if self.options.train_text_encoder:
            bundle.text_encoder.requires_grad_(True)

    def save(self, bundle: ModelBundle, out_dir: Path) -> dict[str, list[str]]:
        from safetensors.torch import save_file

        tensors = {n: p.detach().contiguous().cpu() for n, p in trainable_named_parameters(bundle).items()}
        save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
        listing = {"patterns": self.patterns(), "parameters": sorted(tensors)}
        (out_dir / LIST_FILE).write_text(json.dumps(listing, indent=2))
        return {"partial": files_under(out_dir, [out_dir / WEIGHTS_FILE, out_dir / LIST_FILE])}

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        from safetensors.torch import load_file

        tensors = load_file(run_dir / WEIGHTS_FILE)
        for prefix in ("unet", "text_encoder"):
            part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            if not part:
                continue
            module = getattr(pipe, prefix)
            result = module.load_state_dict(part, strict=False)
            if result.unexpected_keys:
                raise RuntimeError(
                    f"{run_dir / WEIGHTS_FILE}: {len(result.unexpected_keys)} tensors do not exist in the "
                    f"base {prefix} (first: {result.unexpected_keys[0]}); is this the same base model?"
                )
        return pipe
