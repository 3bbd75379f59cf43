"""Adapters through peft: LoRA (and LoCon, with conv targets), DoRA, LoHa and LoKr.

One technique class serves every peft method. The experiment's fields go straight into the
method's peft config class (``rank``/``alpha``/``dropout`` are accepted as friendly aliases), so
peft alone validates them; nothing here re-declares a peft field or writes an adapter layer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdtune.config import ConfigError, build
from sdtune.errors import first_line
from sdtune.formats import community
from sdtune.formats.families import export_facts, family_of_metadata
from sdtune.models import Model
from sdtune.records import CheckFailure
from sdtune.techniques import lora_variants
from sdtune.techniques.base import (
    TECHNIQUES,
    Technique,
    TechniqueOptions,
    TrainedEvidence,
    WeightsDoNotFit,
    files_under,
)
from sdtune.util import atomic

# peft fields that describe the wrapping model, not the adapter: never set from an experiment
_RESERVED_PEFT_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode",
}
ADAPTER_MARKERS = ("lora_", "hada_", "lokr_", "oft_")  # names of peft adapter tensors (oft_R, boft_R/_s)
# peft (0.21) has bitsandbytes layers for LoRA/DoRA and reaches them from OFT/BOFT, none for LyCORIS'
# LoHa/LoKr: it wraps a 4-bit layer as a plain Linear and fails on its packed weight
QUANTIZED_LYCORIS_REFUSED = (
    "peft has no LoHa/LoKr layer for bitsandbytes-quantised layers (it has LoRA, DoRA, OFT and BOFT ones); use one "
    "of those for a quantised base"
)
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "pytorch_lora_weights_kohya.safetensors"


@dataclass
class AdapterOptions(TechniqueOptions):
    text_encoder_target_modules: list[str] | None = None  # None = the family's (CLIP: q/k/v/out_proj)
    init_from: str | None = None  # a kohya/LyCORIS (or peft/diffusers LoRA) .safetensors to start from
    peft: dict[str, Any] = field(default_factory=dict)  # the peft config's arguments, as validated


class AdapterTechnique(Technique):
    """A peft adapter on the denoiser (and optionally the text encoders); the base weights stay
    frozen. ``target_modules`` defaults to the family's (SD1/SDXL: attention ``to_q/k/v/out.0``;
    SD3: the joint attention, ``add_q/k/v_proj`` and ``to_add_out`` too)."""

    Options: ClassVar[type] = AdapterOptions
    path_options = ("init_from",)
    peft_config_name: ClassVar[str]  # the peft config class
    alpha_field: ClassVar[str | None]  # None: the method has no alpha (OFT, BOFT)
    fixed: ClassVar[dict[str, Any]] = {}  # peft arguments this kind sets itself (DoRA: use_dora)
    default_peft_args: ClassVar[dict[str, Any]] = {"r": 4}

    # -- configuration --------------------------------------------------------------------------
    @classmethod
    def config_class(cls) -> type:
        import peft

        return getattr(peft, cls.peft_config_name)

    @classmethod
    def validate_options(cls, raw: dict[str, Any], where: str) -> Any:
        raw = dict(raw)
        own = {f.name for f in dataclasses.fields(cls.Options)} - {"peft"}
        options = build(cls.Options, {key: raw.pop(key) for key in list(raw) if key in own}, where)
        if options.init_from is not None:
            options.init_from = _existing_file(options.init_from, f"{where}.init_from")
        aliases = {"rank": "r", **({"alpha": cls.alpha_field} if cls.alpha_field else {})}
        if cls.alpha_field == "lora_alpha":
            aliases["dropout"] = "lora_dropout"
        peft_args: dict[str, Any] = dict(cls.default_peft_args)
        for key, value in raw.items():
            peft_args[aliases.get(key, key)] = value
        peft_args = cls.complete_peft_args(peft_args, set(raw))
        allowed = {f.name for f in dataclasses.fields(cls.config_class()) if f.init}
        allowed -= _RESERVED_PEFT_FIELDS | set(cls.fixed)
        for key in peft_args:
            if key not in allowed:
                names = sorted(allowed | set(aliases) | own)
                raise ConfigError(
                    f"{where}.{key}: not an option of technique kind {cls.kind!r}; allowed: {', '.join(names)}"
                )
        try:
            cls.config_class()(**peft_args, **cls.fixed)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: peft rejected the {cls.kind} options: {error}") from None
        options.peft = peft_args
        cls.check_options(options, where)
        return options

    @classmethod
    def check_family(cls, options: Any, family: type[Model], where: str) -> None:
        super().check_family(options, family, where)
        if options.init_from is not None:
            check_file_family(Path(options.init_from), family.family, f"{where}.init_from")

    @classmethod
    def complete_peft_args(cls, peft_args: dict[str, Any], given: set[str]) -> dict[str, Any]:
        """The peft arguments with this kind's defaults filled in (``given``: the keys the file set)."""
        peft_args.setdefault(cls.alpha_field, peft_args["r"])  # alpha = rank: scale 1, the usual default
        return peft_args

    @classmethod
    def check_options(cls, options: Any, where: str) -> None:
        """sdtune's own checks of options peft accepted (e.g. initialisations that need data)."""

    @classmethod
    def file_options(cls, options: Any) -> dict[str, Any]:
        own = {k: v for k, v in dataclasses.asdict(options).items() if k != "peft"}
        return {**own, **options.peft}  # peft's own field names are accepted keys

    def peft_config(self, target_modules: list[str], component: torch.nn.Module) -> Any:
        """The peft config of one adapted component (``rank_pattern``/``alpha_pattern``: its own keys)."""
        return self._component_config(self.options.peft, target_modules, component)

    def saved_peft_config(self, target_modules: list[str], component: torch.nn.Module) -> Any:
        """The peft config of one component's saved files (LoRA from PiSSA/OLoRA: the converted adapter's)."""
        return self._component_config(self.saved_peft_args(), target_modules, component)

    def _component_config(self, peft_args: dict[str, Any], target_modules: list[str], component: torch.nn.Module) -> Any:
        args = own_patterns({**peft_args, "target_modules": target_modules}, component)
        return self.config_class()(**args, **self.fixed)

    def saved_peft_args(self) -> dict[str, Any]:
        """The peft arguments the saved files describe (the trained ones unless the technique converts)."""
        return self.options.peft

    def component_targets(self, model: Model) -> dict[str, list[str]]:
        """Adapted component → its target modules (the options', else the family's defaults)."""
        denoiser = model.denoiser_name
        targets = {denoiser: self.options.peft.get("target_modules") or model.adapter_targets[denoiser]}
        for name in self.text_encoders_to_train(model):
            targets[name] = self.options.text_encoder_target_modules or model.adapter_targets[name]
        return targets

    # -- training ---------------------------------------------------------------------------------
    def make_trainable(self, model: Model) -> None:
        from peft import inject_adapter_in_model

        targets = self.component_targets(model)
        for name, modules in targets.items():
            inject_adapter_in_model(self.peft_config(modules, model.components[name]), model.components[name])
            _check_injected(model.components[name], modules, name)
        if self.options.init_from:  # after injection: the file's tensors replace the fresh initialisation
            adapted = {name: model.components[name] for name in targets}
            facts = export_facts(model.family)
            community.initialise_from(Path(self.options.init_from), adapted, facts.community_prefixes, facts.sgm_components)

    def trained_invariants(self, model: Model, evidence: TrainedEvidence) -> list[CheckFailure]:
        """Besides the components: every adapter tensor trains (none left frozen), and every adapted
        layer's merged ΔW is non-zero."""
        failures = super().trained_invariants(model, evidence)
        for component in self.component_targets(model):
            for name, _ in model.components[component].named_parameters():
                full_name = f"{component}.{name}"
                if any(marker in name for marker in ADAPTER_MARKERS) and full_name not in evidence.trained:
                    failures.append(CheckFailure("adapter tensor", full_name, "an adapter tensor is frozen: it never trained"))
        failures += [
            CheckFailure("adapter layer", layer, "the merged ΔW of this adapted layer is zero")
            for layer, norm in sorted(evidence.layer_changes.items()) if norm == 0.0 and evidence.reachable(layer)
        ]
        return failures

    # -- outputs ----------------------------------------------------------------------------------
    def save(self, model: Model, out_dir: Path) -> dict[str, list[str]]:
        adapted = self._adapted_states(model)
        return {"adapter": self._save_peft(adapted, out_dir), **self._save_community(model, adapted, out_dir)}

    @classmethod
    def community_output(cls, family: str) -> tuple[str, str]:
        """(record part, file name) of the kohya/LyCORIS file."""
        return "community", community.COMMUNITY_FILE

    def _save_community(self, model: Model, adapted: list, out_dir: Path) -> dict[str, list[str]]:
        """The kohya/LyCORIS file (A1111, ComfyUI, kohya sd-scripts, LyCORIS); see sdtune.formats.community."""
        part, file_name = self.community_output(model.family)
        facts = export_facts(model.family)
        args = self.saved_peft_args()
        network = {"rank": args.get("r"), "alpha": args.get(self.alpha_field)}
        try:
            tensors = community.adapter_to_community(
                [(name, module, state) for name, module, _, state in adapted], facts.community_prefixes,
                facts.sgm_components, network_alpha=network["alpha"] if self.alpha_field == "lora_alpha" else None,
            )
        except community.CommunityFormatError as error:  # an exotic peft option; the peft files still load
            print(f"no {file_name} written: {error}")
            return {}
        meta = community.metadata(self.kind, model.family, out_dir.name, network)
        community.save(tensors, out_dir / file_name, meta)
        return {part: [file_name]}

    def loads_in(self, part: str, family: str) -> list[str]:
        """Which tools read the files of a record part (``outputs.<part>.loads_in`` of the record)."""
        if part == "adapter":
            return ["sdtune generate", "peft inject_adapter_in_model + set_peft_model_state_dict"]
        return community.tools_reading(self.kind, family)

    def _adapted_states(self, model: Model) -> list[tuple[str, Any, list[str], dict[str, torch.Tensor]]]:
        """(component, module, target modules, adapter tensors) of every adapted component."""
        from peft import get_peft_model_state_dict

        return [
            (name, model.components[name], targets,
             {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model.components[name]).items()})
            for name, targets in self.component_targets(model).items()
        ]

    def _save_peft(self, adapted: list, out_dir: Path) -> list[str]:
        """peft's own format: ``<component>_adapter.safetensors`` + ``<component>_adapter_config.json``."""
        written = []
        for name, module, targets, state in adapted:
            atomic.save_tensors(out_dir / f"{name}_adapter.safetensors", state, {"format": "pt"})
            config = self.saved_peft_config(targets, module).to_dict()
            atomic.write_json(out_dir / f"{name}_adapter_config.json", _jsonable(config))
            written += [out_dir / f"{name}_adapter.safetensors", out_dir / f"{name}_adapter_config.json"]
        return files_under(out_dir, written)

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        return cls.load_peft_files(pipe, run_dir)

    @classmethod
    def load_peft_files(cls, pipe: Any, run_dir: Path) -> Any:
        """Inject and fill the adapters of ``<component>_adapter.safetensors`` (peft's own files)."""
        from peft import inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        for weights in sorted(run_dir.glob("*_adapter.safetensors")):
            name = weights.name[: -len("_adapter.safetensors")]
            config_dict = json.loads((run_dir / f"{name}_adapter_config.json").read_text())
            config = cls.config_class().from_peft_type(**config_dict)
            module = getattr(pipe, name)
            inject_adapter_in_model(config, module)
            result = set_peft_model_state_dict(module, load_file(weights))
            unexpected = getattr(result, "unexpected_keys", [])
            missing = [k for k in getattr(result, "missing_keys", []) if any(m in k for m in ADAPTER_MARKERS)]
            if unexpected or missing:
                raise WeightsDoNotFit(
                    f"{weights}: {len(unexpected)} adapter tensors did not fit the model and {len(missing)} "
                    "adapter tensors were missing; is this the run's base model?"
                )
        return pipe

    @classmethod
    def merge(cls, pipe: Any) -> Any:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                merge_adapters(module)
        return pipe


def scale_folded(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA state dict (peft's keys) with each layer's scale (alpha / rank, rsLoRA's alpha / √rank,
    ``rank_pattern``/``alpha_pattern`` included) folded into its B matrix, so that the file means the
    same at scale 1 in every layer: in diffusers with or without its metadata (a mixed-rank file
    without alpha information loads at scale 1 per layer since diffusers #14409), and in any loader
    that follows the peft/diffusers convention alpha = rank."""
    folded = dict(state)
    for path, layer in community.adapter_layers(module):
        scaling = float(layer.scaling[community.ADAPTER])
        for key in (f"{path}.lora_B.weight", f"{path}.lora_B.bias"):
            if key in folded:
                folded[key] = (folded[key].float() * scaling).to(folded[key].dtype)
    return folded


def merge_adapters(model: torch.nn.Module) -> None:
    """Fold every peft adapter layer of ``model`` into its base layer and remove the wrapper."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False


def _existing_file(value: str, where: str) -> str:
    path = Path(value).expanduser()
    if not path.is_file() or path.suffix != ".safetensors":
        raise ConfigError(
            f"{where}: {value!r} is not a .safetensors file; give a kohya/LyCORIS or diffusers LoRA file "
            "(absolute, or relative to the experiment file)"
        )
    return str(path.resolve())


def check_file_family(path: Path, family: str, where: str) -> None:
    """A community file whose metadata names another family than the model's is refused before the
    model loads (its layers would not fit; a file that does not say is checked layer by layer later)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata()
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ConfigError(f"{where}: {str(path)!r} is not a readable .safetensors file ({first_line(error)})") from None
    trained_on = family_of_metadata(metadata)
    if trained_on is not None and trained_on != family:
        raise ConfigError(
            f"{where}: {path.name} was trained on a model of family {trained_on} (its metadata says so) but this "
            f"experiment's model is {family}; give a file trained on a {family} model, or remove init_from"
        )


def own_patterns(peft_args: dict[str, Any], component: torch.nn.Module) -> dict[str, Any]:
    """``peft_args`` with only the ``rank_pattern``/``alpha_pattern`` keys that name a module of
    ``component``, matched as peft matches them (``get_pattern_key``: the key is the end of a module's
    path). A technique's patterns cover every component it adapts (``to_q`` is the UNet's, ``q_proj``
    the text encoder's); peft ignores another component's keys with a warning, and they would be
    written into this component's files as if they applied there."""
    import re

    if not (peft_args.get("rank_pattern") or peft_args.get("alpha_pattern")):
        return peft_args
    names = [name for name, _ in component.named_modules()]
    kept = dict(peft_args)
    for field_name in ("rank_pattern", "alpha_pattern"):
        if peft_args.get(field_name):
            kept[field_name] = {
                key: value for key, value in peft_args[field_name].items()
                if any(re.match(rf"(.*\.)?({key})$", name) for name in names)
            }
    return kept


def _check_injected(module: torch.nn.Module, targets: list[str], what: str) -> None:
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError(f"target_modules {targets} matched no layer of the {what}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, tuple, list)):
        return [_jsonable(v) for v in sorted(value, key=str)] if isinstance(value, set) else [
            _jsonable(v) for v in value
        ]
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums
        return value.value
    return value


@dataclass
class LoRAOptions(AdapterOptions):
    loraplus_lr_ratio: float | None = None  # LoRA+: the B matrices train at learning_rate × this (None: off)


@TECHNIQUES.register("lora")
class LoRA(AdapterTechnique):
    """LoRA (Hu et al. 2021); with conv layers in target_modules it is LoCon. rsLoRA (``use_rslora``),
    PiSSA/OLoRA (``init_lora_weights``) and LoRA+ (``loraplus_lr_ratio``): see :mod:`.lora_variants`.

    Besides the peft files it writes ``pytorch_lora_weights.safetensors`` (diffusers'
    ``load_lora_weights``) and the kohya/LyCORIS file (SD1/2/XL: ``pytorch_lora_weights_kohya.safetensors``).
    """

    kind = "lora"
    Options = LoRAOptions
    peft_config_name = "LoraConfig"
    alpha_field = "lora_alpha"
    fixed = {"use_dora": False}  # DoRA is its own kind
    initial_states: dict[str, dict[str, torch.Tensor]] | None = None  # PiSSA/OLoRA: A₀, B₀ per component

    @classmethod
    def check_options(cls, options: Any, where: str) -> None:
        lora_variants.check(options.peft, options.loraplus_lr_ratio, cls.kind, options.init_from, where)

    def parameter_groups(self, parameters: dict[str, torch.nn.Parameter], learning_rate: float) -> list[dict[str, Any]]:
        if self.options.loraplus_lr_ratio is None:
            return super().parameter_groups(parameters, learning_rate)
        return lora_variants.loraplus_groups(parameters, learning_rate, self.options.loraplus_lr_ratio)

    def make_trainable(self, model: Model) -> None:
        mutates = lora_variants.mutates_base(self.options.peft.get("init_lora_weights", True))
        for name, modules in self.component_targets(model).items() if mutates else ():
            lora_variants.check_linear_targets(self.peft_config(modules, model.components[name]), model.components[name], name)
        super().make_trainable(model)
        self.initial_states = None
        if mutates:
            # what PiSSA/OLoRA took out of the base weights (recomputed the same way on resume)
            self.initial_states = {  # (copies: on the CPU the state dict's tensors are the parameters)
                name: {key: value.clone() for key, value in state.items()} for name, _, _, state in super()._adapted_states(model)
            }

    def _adapted_states(self, model: Model) -> list[tuple[str, Any, list[str], dict[str, torch.Tensor]]]:
        adapted = super()._adapted_states(model)
        if not self.initial_states:
            return adapted
        return [
            (name, module, targets, lora_variants.subtract_initial(state, self.initial_states[name]))
            for name, module, targets, state in adapted
        ]

    def saved_peft_args(self) -> dict[str, Any]:
        if lora_variants.mutates_base(self.options.peft.get("init_lora_weights", True)):
            return lora_variants.converted_config_args(self.options.peft)
        return self.options.peft

    def save(self, model: Model, out_dir: Path) -> dict[str, list[str]]:
        adapted = self._adapted_states(model)
        parts = {"adapter": self._save_peft(adapted, out_dir)}
        lora_layers: dict[str, Any] = {}  # save_lora_weights takes <component>_lora_layers for each component
        for name, module, targets, state in adapted:
            # peft's keys, as diffusers writes them itself: its older converted spelling renames only
            # attention layers, and a file mixing both spellings (LoCon) loads without the attention ones
            lora_layers[f"{name}_lora_layers"] = scale_folded(module, state)
            lora_layers[f"{name}_lora_adapter_metadata"] = _jsonable(self.unit_scale_config(targets, module).to_dict())
        model.pipeline_class().save_lora_weights(
            out_dir, weight_name=DIFFUSERS_LORA_FILE, safe_serialization=True, **lora_layers
        )
        parts["diffusers_lora"] = [DIFFUSERS_LORA_FILE]
        return {**parts, **self._save_community(model, adapted, out_dir)}

    def unit_scale_config(self, targets: list[str], component: torch.nn.Module) -> Any:
        """The saved peft config with every layer's alpha equal to its rank (scale 1), for a file
        whose scales are folded into its B matrices (:func:`scale_folded`)."""
        config = self.saved_peft_config(targets, component)
        config.lora_alpha, config.use_rslora = config.r, False
        config.alpha_pattern = dict(config.rank_pattern or {})
        return config

    @classmethod
    def community_output(cls, family: str) -> tuple[str, str]:
        if export_facts(family).kohya_lora_file:  # the kohya LoRA file (same name as before it had a sibling)
            return "kohya_lora", KOHYA_LORA_FILE
        return super().community_output(family)

    def loads_in(self, part: str, family: str) -> list[str]:
        if part == "diffusers_lora":
            return ["diffusers load_lora_weights", "sdtune generate"]
        return super().loads_in(part, family)

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        pipe.load_lora_weights(str(run_dir), weight_name=DIFFUSERS_LORA_FILE, adapter_name="default")
        return pipe


@TECHNIQUES.register("dora")
class DoRA(LoRA):
    """Weight-decomposed LoRA (Liu et al. 2024): peft ``LoraConfig(use_dora=True)``; saved for
    diffusers' ``load_lora_weights`` and as LyCORIS DoRA (``dora_scale`` per output row)."""

    kind = "dora"
    fixed = {"use_dora": True}

    def trained_invariants(self, model: Model, evidence: TrainedEvidence) -> list[CheckFailure]:
        """Besides LoRA's: every adapted layer has a DoRA magnitude vector, and it moved (a "DoRA" that
        trains as plain LoRA has none, or leaves them where they started)."""
        failures = super().trained_invariants(model, evidence)
        for layer in sorted(evidence.layer_changes):
            if not evidence.reachable(layer):
                continue
            magnitudes = [n for n in evidence.trained if n.startswith(f"{layer}.lora_magnitude_vector.")]
            if not magnitudes:
                failures.append(CheckFailure("magnitude", layer, "no trained DoRA magnitude vector: the layer trains as plain LoRA"))
            elif not any(evidence.moved.get(n) for n in magnitudes):
                failures.append(CheckFailure("magnitude", layer, "the DoRA magnitude vector did not move"))
        return failures

    @classmethod
    def community_output(cls, family: str) -> tuple[str, str]:
        return "community", community.COMMUNITY_FILE

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        # sdtune reads its own peft files: diffusers' load_lora_weights drops the DoRA magnitudes of
        # transformers ≥ 5 text encoders (their "lora_magnitude_vector" keys miss the ".weight" level)
        return cls.load_peft_files(pipe, run_dir)


@TECHNIQUES.register("loha")
class LoHa(AdapterTechnique):
    """Low-rank Hadamard product (Hyeon-Woo et al. 2022, FedPara; LyCORIS): peft ``LoHaConfig``."""

    kind = "loha"
    peft_config_name = "LoHaConfig"
    alpha_field = "alpha"
    quantized_denoiser_refused = QUANTIZED_LYCORIS_REFUSED


@TECHNIQUES.register("lokr")
class LoKr(AdapterTechnique):
    """Low-rank Kronecker product (Yeh et al. 2023, LyCORIS): peft ``LoKrConfig``."""

    kind = "lokr"
    peft_config_name = "LoKrConfig"
    alpha_field = "alpha"
    quantized_denoiser_refused = QUANTIZED_LYCORIS_REFUSED
