"""Partial fine-tuning: full-rank training of a chosen subset of the denoiser, the rest frozen.

Saves only the trained tensors plus the list of their names; loading puts them onto the base
model. It also writes the per-layer differences to the base model in the kohya/LyCORIS layout
(``diff``/``diff_b``, ``w_norm``/``b_norm``), which A1111, ComfyUI and LyCORIS add to the base model.
Presets (each model family names its own: ``cross-attention`` for UNets, ``context`` for SD3's
joint attention, …) name the common choices; a list of patterns (fnmatch, matched against
parameter names such as ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``)
picks any.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.config.schema import ConfigError
from sdtune.formats import community
from sdtune.techniques.base import (
    TECHNIQUES,
    Technique,
    TechniqueOptions,
    files_under,
    trainable_named_parameters,
)

if TYPE_CHECKING:
    from sdtune.models import ModelBundle

WEIGHTS_FILE = "partial_weights.safetensors"
LIST_FILE = "trained_parameters.json"


@dataclass
class PartialOptions(TechniqueOptions):
    preset: str | None = None  # one of the family's presets; None = its first (SD1/SDXL: cross-attention)
    modules: list[str] = field(default_factory=list)  # fnmatch patterns of denoiser parameter names


@TECHNIQUES.register("partial")
class PartialFineTuning(Technique):
    kind = "partial"
    Options = PartialOptions

    @classmethod
    def check_family(cls, options: dict[str, Any], family: Any, where: str) -> None:
        super().check_family(options, family, where)
        preset = options.get("preset")
        if preset is not None and preset not in family.partial_presets:
            raise ConfigError(
                f"{where}.preset: {preset!r} is not a preset of {family.name}; choose one of: "
                f"{', '.join(family.partial_presets)}, or give `modules: [patterns]`"
            )

    def patterns(self, family: Any) -> list[str]:
        preset = self.options.preset
        if preset is None and not self.options.modules:
            preset = next(iter(family.partial_presets))
        return family.partial_presets.get(preset or "", []) + list(self.options.modules)

    def make_trainable(self, bundle: ModelBundle) -> None:
        patterns = self.patterns(bundle.family)
        matched = 0
        for name, parameter in bundle.denoiser.named_parameters():
            if any(fnmatchcase(name, pattern) for pattern in patterns):
                parameter.requires_grad_(True)
                matched += 1
        if not matched:
            raise ConfigError(f"partial: the patterns {patterns} match no {bundle.family.denoiser} parameter")
        for name in self.text_encoders_to_train(bundle):
            bundle.components[name].requires_grad_(True)
        # the base values of what trains (a resumed run restores its tensors after this): the
        # community file holds trained − base
        self.base_values = {n: p.detach().to("cpu", copy=True) for n, p in trainable_named_parameters(bundle).items()}

    def save(self, bundle: ModelBundle, out_dir: Path) -> dict[str, list[str]]:
        from safetensors.torch import save_file

        tensors = {n: p.detach().contiguous().cpu() for n, p in trainable_named_parameters(bundle).items()}
        save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
        listing = {"patterns": self.patterns(bundle.family), "parameters": sorted(tensors)}
        (out_dir / LIST_FILE).write_text(json.dumps(listing, indent=2))
        parts = {"partial": files_under(out_dir, [out_dir / WEIGHTS_FILE, out_dir / LIST_FILE])}
        return {**parts, **self._save_community(bundle, tensors, out_dir)}

    def _save_community(self, bundle: ModelBundle, tensors: dict, out_dir: Path) -> dict[str, list[str]]:
        """The differences to the base model as a LyCORIS "full" file (see sdtune.formats.community)."""
        family = bundle.family
        try:
            differences = community.differences_to_community(
                tensors, self.base_values, bundle.components, family.community_prefixes,
                community.sgm_components(family),
            )
        except community.CommunityFormatError as error:  # e.g. text-encoder embeddings: no such layout
            print(f"no {community.COMMUNITY_FILE} written: {error}; `sdtune export --single-file` has every weight")
            return {}
        meta = community.metadata(self.kind, family, out_dir.name, {})
        community.save(differences, out_dir / community.COMMUNITY_FILE, meta)
        return {"community": [community.COMMUNITY_FILE]}

    def loads_in(self, part: str, family: Any) -> list[str]:
        """Which tools read the files of a record part (``outputs.<part>.loads_in`` of the record)."""
        if part == "partial":
            return ["sdtune generate"]
        return community.tools_reading(self.kind, family)

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        from safetensors.torch import load_file

        tensors = load_file(run_dir / WEIGHTS_FILE)
        for prefix in sorted({key.split(".", 1)[0] for key in tensors}):
            part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            module = getattr(pipe, prefix)
            result = module.load_state_dict(part, strict=False)
            if result.unexpected_keys:
                raise RuntimeError(
                    f"{run_dir / WEIGHTS_FILE}: {len(result.unexpected_keys)} tensors do not exist in the "
                    f"base {prefix} (first: {result.unexpected_keys[0]}); is this the same base model?"
                )
        return pipe
