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

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from sdtune.config import ConfigError
from sdtune.formats import community
from sdtune.formats.families import export_facts
from sdtune.models import Model
from sdtune.records import CheckFailure
from sdtune.techniques.base import (
    TECHNIQUES,
    Technique,
    TechniqueOptions,
    TrainedEvidence,
    WeightsDoNotFit,
    files_under,
    trainable_named_parameters,
)
from sdtune.util import atomic

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
    def check_family(cls, options: Any, family: type[Model], where: str) -> None:
        super().check_family(options, family, where)
        preset = options.preset
        if preset is not None and preset not in family.partial_presets:
            raise ConfigError(
                f"{where}.preset: {preset!r} is not a preset of {family.family}; choose one of: "
                f"{', '.join(family.partial_presets)}, or give `modules: [patterns]`"
            )

    def patterns(self, family: type[Model]) -> list[str]:
        preset = self.options.preset
        if preset is None and not self.options.modules:
            preset = next(iter(family.partial_presets))
        return family.partial_presets.get(preset or "", []) + list(self.options.modules)

    def make_trainable(self, model: Model) -> None:
        patterns = self.patterns(type(model))
        matched = 0
        for name, parameter in model.denoiser.named_parameters():
            if any(fnmatchcase(name, pattern) for pattern in patterns):
                parameter.requires_grad_(True)
                matched += 1
        if not matched:
            raise ConfigError(f"partial: the patterns {patterns} match no {model.denoiser_name} parameter")
        for name in self.text_encoders_to_train(model):
            model.components[name].requires_grad_(True)
        # the base values of what trains (a resumed run restores its tensors after this): the
        # community file holds trained − base
        self.base_values = {n: p.detach().to("cpu", copy=True) for n, p in trainable_named_parameters(model).items()}

    def trained_invariants(self, model: Model, evidence: TrainedEvidence) -> list[CheckFailure]:
        """Besides the components: what trained in the denoiser is exactly what the patterns choose."""
        failures = super().trained_invariants(model, evidence)
        patterns, denoiser = self.patterns(type(model)), model.denoiser_name
        chosen = {
            f"{denoiser}.{name}" for name, _ in model.denoiser.named_parameters()
            if any(fnmatchcase(name, pattern) for pattern in patterns)
        }
        trained = {name for name in evidence.trained if name.startswith(f"{denoiser}.")}
        failures += [CheckFailure("partial", name, "chosen by the patterns, but frozen") for name in sorted(chosen - trained)]
        failures += [CheckFailure("partial", name, "trained, but not chosen by the patterns") for name in sorted(trained - chosen)]
        return failures

    def save(self, model: Model, out_dir: Path) -> dict[str, list[str]]:
        tensors = {n: p.detach().contiguous().cpu() for n, p in trainable_named_parameters(model).items()}
        atomic.save_tensors(out_dir / WEIGHTS_FILE, tensors, {"format": "pt"})
        atomic.write_json(out_dir / LIST_FILE, {"patterns": self.patterns(type(model)), "parameters": sorted(tensors)})
        parts = {"partial": files_under(out_dir, [out_dir / WEIGHTS_FILE, out_dir / LIST_FILE])}
        return {**parts, **self._save_community(model, tensors, out_dir)}

    def _save_community(self, model: Model, tensors: dict, out_dir: Path) -> dict[str, list[str]]:
        """The differences to the base model as a LyCORIS "full" file (see sdtune.formats.community)."""
        facts = export_facts(model.family)
        try:
            differences = community.differences_to_community(
                tensors, self.base_values, model.components, facts.community_prefixes, facts.sgm_components,
            )
        except community.CommunityFormatError as error:  # e.g. text-encoder embeddings: no such layout
            print(f"no {community.COMMUNITY_FILE} written: {error}; `sdtune export --single-file` has every weight")
            return {}
        meta = community.metadata(self.kind, model.family, out_dir.name, {})
        community.save(differences, out_dir / community.COMMUNITY_FILE, meta)
        return {"community": [community.COMMUNITY_FILE]}

    def loads_in(self, part: str, family: str) -> list[str]:
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
                raise WeightsDoNotFit(
                    f"{run_dir / WEIGHTS_FILE}: {len(result.unexpected_keys)} tensors do not exist in the "
                    f"base {prefix} (first: {result.unexpected_keys[0]}); is this the same base model?"
                )
        return pipe
