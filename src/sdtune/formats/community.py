"""Adapter and partial-training weights in the community layout (kohya / LyCORIS), both ways.

One file per run that A1111/Forge, ComfyUI, kohya sd-scripts and the LyCORIS loader read. Each
adapted layer is one name, ``<prefix><module path with '.' → '_'>`` (the family's
``community_prefixes``: SD1/2 ``lora_unet_``/``lora_te_``, SDXL ``lora_unet_``/``lora_te1_``/
``lora_te2_``, SD3 SimpleTuner's ``lycoris_`` for the transformer and ``lora_te1/2/3_`` for its
text encoders, as ComfyUI maps them). The module path is the one kohya sd-scripts' own trainer
names (the family's ``kohya_trainer_names_unet``): diffusers' UNet path for SD1/2
(``down_blocks_1_attentions_0_…``), Stability's SGM path for SDXL's UNet (``input_blocks_4_1_…``,
``middle_block_1_…``, ``output_blocks_…``, resnets ``in_layers_2``/``emb_layers_1``/``out_layers_3``/
``skip_connection``, ``time_embed_0``, ``label_emb_0_0``: the names of the single-file checkpoint,
``sdtune.formats.single_file``, whose mapping diffusers' ``from_single_file`` checks). Reading (``init_from``)
takes both namings. Each name is followed by the method's tensors:

=========  ======================================================  ==============================
method     tensors (LyCORIS names)                                 from peft
=========  ======================================================  ==============================
LoRA/LoCon ``lora_down.weight`` (r×in[×k×k]), ``lora_up.weight``    ``lora_A.weight``, ``lora_B.weight``
DoRA       + ``dora_scale`` (out×1[×1×1]: the magnitude of each     ``lora_magnitude_vector``
           *output* row, LyCORIS' ``wd_on_out``; peft's norm too)
LoHa       ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``  the same names
           (+ ``hada_t1``/``hada_t2``: Tucker cores of k×k convs)
LoKr       ``lokr_w1`` or ``lokr_w1_a``/``_b``; ``lokr_w2`` or          the same names
           ``lokr_w2_a``/``_b`` (+ ``lokr_t2``); ΔW = w1 ⊗ w2
full rank  ``diff``/``diff_b`` (linear, conv), ``w_norm``/``b_norm``  trained − base weights
           (norm layers)
=========  ======================================================  ==============================

plus ``alpha`` for every adapted layer, so that every loader's scale alpha / rank (rank = the
``lora_down``/``hada_w1_b`` rows, LoKr's ``w1_b``/``w2_b`` rows) gives peft's scaling for that
layer (rsLoRA, ``rank_pattern`` and ``alpha_pattern`` included). LoRA and DoRA layers all carry
the file's one network alpha (``ss_network_alpha``), each layer's own scale folded into its
``lora_up`` where it differs: diffusers reads a kohya file's alphas as one value plus a per-layer
pattern whose keys it misnames, so a file with mixed alphas would lose the differing ones there
(mixed ranks alone are fine). A LoKr layer with no factorised side has no rank in the file and
every loader uses scale 1, so peft's scaling is folded into ``lokr_w1``. Text encoders are named as in the original checkpoints (``text_model.encoder…``),
whichever nesting transformers gives ``CLIPTextModel``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sdtune.config.schema import ConfigError
from sdtune.formats.families import export_facts
from sdtune.formats.single_file import UnknownKeyError, unet_original_key
from sdtune.util import atomic

Tensors = dict[str, torch.Tensor]
COMMUNITY_FILE = "community_weights.safetensors"
LORA_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ADAPTER = "default"  # peft's adapter name (sdtune injects one adapter per component)


class CommunityFormatError(ValueError):
    """Weights that the community layout cannot express (the message names the first one)."""


# -- names ----------------------------------------------------------------------------------------
def canonical_path(module: torch.nn.Module, path: str) -> str:
    """A module path in the original checkpoints' nesting: transformers ≥ 5 dropped ``CLIPTextModel``'s
    ``text_model`` level (``encoder.layers.0…``); every tool's key map still has it."""
    flattened = type(module).__name__.startswith("CLIPText") and not hasattr(module, "text_model")
    if flattened and path and not path.startswith("text_projection"):
        return f"text_model.{path}"
    return path


def sgm_path(unet: torch.nn.Module, path: str) -> str:
    """The SGM (SDXL single-file checkpoint, kohya sd-scripts' SDXL UNet) path of a diffusers UNet
    layer, e.g. ``down_blocks.1.attentions.0.proj_in`` → ``input_blocks.4.1.proj_in``."""
    try:
        return unet_original_key(f"{path}.weight", dict(unet.config)).removesuffix(".weight")
    except UnknownKeyError as error:  # a layer the SGM checkpoint does not have: no community name
        raise CommunityFormatError(str(error)) from None


def layer_name(prefix: str, module: torch.nn.Module, path: str, sgm: bool = False) -> str:
    return prefix + (sgm_path(module, path) if sgm else canonical_path(module, path)).replace(".", "_")


def layer_names(module: torch.nn.Module, prefix: str, sgm: bool = False) -> dict[str, str]:
    """Community layer name → module path, for every submodule of ``module``; with ``sgm`` the SGM
    names of its weighted layers too (a container can share its layer's SGM name: a downsampler is
    ``…_0_op`` and so is its conv)."""
    names = {layer_name(prefix, module, path): path for path, _ in module.named_modules() if path}
    for path, layer in module.named_modules() if sgm else ():
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):  # (peft's wrappers show their base's)
            continue
        try:
            name = layer_name(prefix, module, path, sgm=True)
        except CommunityFormatError:  # inside a peft wrapper of a top-level layer (conv_in.base_layer)
            continue
        if names.setdefault(name, path) != path:
            raise CommunityFormatError(f"{names[name]} and {path} both have the SGM name {name}")
    return names


def adapter_layers(module: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """(path, peft tuner layer) of every layer of ``module`` that carries sdtune's adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer) and ADAPTER in getattr(layer, "r", {}):
            yield path, layer


# -- peft → community -----------------------------------------------------------------------------
def adapter_to_community(
    adapted: list[tuple[str, torch.nn.Module, Tensors]], prefixes: dict[str, str], sgm: tuple[str, ...] = (),
    network_alpha: float | None = None,
) -> Tensors:
    """The community tensors of peft adapters: ``adapted`` is (component, module, peft state dict
    as ``get_peft_model_state_dict`` gives it) per adapted component; ``sgm``: the components named
    by their SGM paths (:func:`sgm_components`); ``network_alpha``: the alpha every LoRA/DoRA layer
    carries (None: each its own, scale × rank)."""
    result: Tensors = {}
    for component, module, state in adapted:
        if component not in prefixes:
            raise CommunityFormatError(f"the {component} has no community key prefix in this family")
        for path, layer in adapter_layers(module):
            tensors = {key[len(path) + 1:]: value for key, value in state.items() if key.startswith(path + ".")}
            name = layer_name(prefixes[component], module, path, sgm=component in sgm)
            for suffix, value in _layer_to_community(layer, tensors, f"{component}.{path}", network_alpha).items():
                result[f"{name}.{suffix}"] = value.detach().to("cpu").contiguous()
    return result


def _layer_to_community(layer: Any, tensors: Tensors, where: str, network_alpha: float | None = None) -> Tensors:
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    scaling = float(layer.scaling[ADAPTER])
    rank = int(layer.r[ADAPTER])
    if isinstance(layer, LoraLayer):
        if getattr(layer, "lora_bias", {}).get(ADAPTER):
            raise CommunityFormatError(f"{where}: lora_bias has no kohya/LyCORIS form")
        out = {LORA_NAMES[key]: value for key, value in tensors.items() if key in LORA_NAMES}
        if len(out) != 2:
            raise CommunityFormatError(f"{where}: a {type(layer).__name__} LoRA layer has no kohya/LyCORIS form")
        if "lora_magnitude_vector" in tensors:  # DoRA: peft's (out,) or (1, out, 1, 1) → (out, 1[, 1, 1])
            weight_dims = layer.get_base_layer().weight.dim()
            out["dora_scale"] = tensors["lora_magnitude_vector"].reshape(-1, *[1] * (weight_dims - 1))
        own_alpha = scaling * out["lora_down.weight"].shape[0]  # the alpha that gives this layer's scale
        alpha = own_alpha if network_alpha is None else float(network_alpha)
        if not math.isclose(own_alpha, alpha, rel_tol=1e-6):  # the layer's scale folded into lora_up
            up = out["lora_up.weight"]
            out["lora_up.weight"] = (up.float() * (own_alpha / alpha)).to(up.dtype)
        out["alpha"] = torch.tensor(alpha)
        return out
    if isinstance(layer, LoHaLayer):
        out = {key: tensors[key] for key in LOHA_NAMES if key in tensors}
        out["alpha"] = torch.tensor(scaling * rank)
        return out
    if isinstance(layer, LoKrLayer):
        out = {key: tensors[key] for key in LOKR_NAMES if key in tensors}
        if "lokr_w1" in out and "lokr_w2" in out:  # no rank in the file: loaders use scale 1
            out["lokr_w1"] = out["lokr_w1"] * scaling
            out["alpha"] = torch.tensor(float(rank))
        else:
            out["alpha"] = torch.tensor(scaling * rank)
        return out
    raise CommunityFormatError(f"{where}: {type(layer).__name__} has no kohya/LyCORIS form")


# -- full-rank differences (partial training) -------------------------------------------------------
def differences_to_community(
    trained: Tensors, base: Tensors, components: dict[str, torch.nn.Module], prefixes: dict[str, str],
    sgm: tuple[str, ...] = (),
) -> Tensors:
    """Per-layer weight differences of full-rank training: ``trained``/``base`` map
    ``<component>.<parameter>`` to tensors. Linear and conv layers get ``diff``/``diff_b``, norm
    layers ``w_norm``/``b_norm`` (a layer with only its bias trained gets a zero weight difference,
    which LyCORIS needs to find it); embeddings and bare parameters have no such form."""
    result: Tensors = {}
    for key in sorted(trained):
        component, _, parameter = key.partition(".")
        path, _, leaf = parameter.rpartition(".")
        module = components[component]
        layer = module.get_submodule(path) if path else module
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            names = {"weight": "diff", "bias": "diff_b"}
        elif hasattr(layer, "weight") and layer.weight is not None and layer.weight.dim() == 1 and not isinstance(
            layer, torch.nn.Embedding
        ):
            names = {"weight": "w_norm", "bias": "b_norm"}
        else:
            names = {}
        if component not in prefixes or leaf not in names:
            raise CommunityFormatError(f"{key} ({type(layer).__name__}) has no kohya/LyCORIS difference form")
        name = layer_name(prefixes[component], module, path, sgm=component in sgm)
        result[f"{name}.{names[leaf]}"] = (trained[key].float() - base[key].float()).to(trained[key].dtype).contiguous()
        weight_name = f"{name}.{names['weight']}"
        if leaf == "bias" and weight_name not in result:
            result[weight_name] = torch.zeros_like(layer.weight, device="cpu")
    return result


# -- metadata ----------------------------------------------------------------------------------------
def metadata(kind: str, family: str, title: str, network: dict[str, Any]) -> dict[str, str]:
    """The keys kohya sd-scripts writes and A1111/Forge show (``ss_*``), and Stability's ModelSpec."""
    facts = export_facts(family)
    lycoris = kind not in ("lora", "dora")
    algo = {"lora": "lora", "dora": "lora", "loha": "loha", "lokr": "lokr", "partial": "full"}[kind]
    args = {"algo": algo, **({"dora_wd": "True", "wd_on_output": "True"} if kind == "dora" else {})}
    adapter = "lycoris" if lycoris or kind == "dora" else "lora"
    return {
        "format": "pt",
        "ss_network_module": "lycoris.kohya" if lycoris or kind == "dora" else "networks.lora",
        "ss_network_args": json.dumps(args),
        "ss_network_dim": str(network.get("rank", "")),
        "ss_network_alpha": str(network.get("alpha", "")),
        "ss_base_model_version": facts.kohya_base_model_version,
        "ss_v2": str(family == "sd2"),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{facts.modelspec_architecture}/{adapter}",
        "modelspec.implementation": "https://github.com/KohakuBlueleaf/LyCORIS" if adapter == "lycoris"
        else "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": title,
        "sdtune.technique": kind,
    }


def save(tensors: Tensors, path: Path, meta: dict[str, str]) -> Path:
    return atomic.save_tensors(path, tensors, meta)


# -- community → peft (init_from) -------------------------------------------------------------------
FILE_KINDS = (("dora_scale", "dora"), ("hada_", "loha"), ("lokr_", "lokr"), ("lora_", "lora"))  # tensor → kind
PEFT_LORA_SPELLINGS = {  # diffusers/peft LoRA files: their tensor names → kohya's
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale", "alpha": "alpha",
}


def load_layers(
    path: Path, components: dict[str, torch.nn.Module], prefixes: dict[str, str], sgm: tuple[str, ...] = (),
    what: str = "init_from",
) -> dict[str, Tensors]:
    """The file's layers as ``<component>.<module path>`` → {community tensor name: tensor}.

    Reads the community layout (any of the family's prefixes; for the ``sgm`` components SGM and
    diffusers paths alike) and peft/diffusers LoRA files (``<component>.<module path>.lora_A.weight`` …,
    scale 1 unless the file has ``alpha`` keys). ``what`` names the option (or command) in errors.
    """
    from safetensors.torch import load_file

    names = {}
    for component, module in components.items():
        if component in prefixes:
            found = layer_names(module, prefixes[component], sgm=component in sgm)
            names.update({name: f"{component}.{p}" for name, p in found.items()})
        names.update({f"{component}.{canonical_path(module, p)}": f"{component}.{p}" for p, _ in module.named_modules() if p})
        names.update({f"{component}.{p}": f"{component}.{p}" for p, _ in module.named_modules() if p})
    layers: dict[str, Tensors] = {}
    for key, value in load_file(str(path)).items():
        for spelling, kohya_name in PEFT_LORA_SPELLINGS.items():
            if key.endswith("." + spelling) and key[: -len(spelling) - 1] in names:
                layer, tensor_name = key[: -len(spelling) - 1], kohya_name
                break
        else:
            layer, _, tensor_name = key.partition(".")
        if layer not in names:
            raise ConfigError(
                f"{what}: {path.name} has weights for {layer!r}, which is no layer of "
                f"{', '.join(components)}; is it for this model family (and text encoders trained)?"
            )
        layers.setdefault(names[layer], {})[tensor_name] = value
    return layers


def community_to_peft(layer: Any, tensors: Tensors, where: str) -> Tensors:
    """peft's tensors (names without the adapter) for one injected layer, from its community tensors;
    the file's scale is folded into one factor so that the layer's ΔW is the file's."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    tensors = dict(tensors)
    alpha = tensors.pop("alpha", None)
    scaling = float(layer.scaling[ADAPTER])
    if isinstance(layer, LoraLayer) and "lora_down.weight" in tensors:
        down, up = tensors.pop("lora_down.weight"), tensors.pop("lora_up.weight")
        file_scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        out = {"lora_A.weight": down, "lora_B.weight": up * (file_scale / scaling)}
        if "dora_scale" in tensors:
            magnitude = layer.lora_magnitude_vector[ADAPTER].weight if ADAPTER in layer.lora_magnitude_vector else None
            if magnitude is None:
                raise ConfigError(f"init_from: {where} is DoRA in the file; use kind: dora")
            out["lora_magnitude_vector"] = tensors.pop("dora_scale").reshape(magnitude.shape)
    elif isinstance(layer, LoHaLayer) and "hada_w1_a" in tensors:
        file_scale = 1.0 if alpha is None else float(alpha) / tensors["hada_w1_b"].shape[0]
        out = {key: tensors.pop(key) for key in LOHA_NAMES if key in tensors}
        out["hada_w1_a"] = out["hada_w1_a"] * (file_scale / scaling)
    elif isinstance(layer, LoKrLayer) and ("lokr_w1" in tensors or "lokr_w1_a" in tensors):
        out = {key: tensors.pop(key) for key in LOKR_NAMES if key in tensors}
        rank_side = out.get("lokr_w1_b", out.get("lokr_w2_b"))
        file_scale = 1.0 if alpha is None or rank_side is None else float(alpha) / rank_side.shape[0]
        first = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
        out[first] = out[first] * (file_scale / scaling)
    else:
        names = sorted(tensors)
        found = next((k for m, k in FILE_KINDS if any(n.startswith(m) for n in names)), "partial (diff)")
        ours = {"LoraLayer": "lora", "LoHaLayer": "loha", "LoKrLayer": "lokr"}
        method = next((ours[c.__name__] for c in type(layer).__mro__ if c.__name__ in ours), type(layer).__name__)
        raise ConfigError(
            f"init_from: {where} holds {', '.join(names)} (a {found} file), which a {method} technique cannot "
            f"take; use kind: {found}"
        )
    if tensors:
        raise ConfigError(f"init_from: {where} has tensors this technique does not use: {', '.join(sorted(tensors))}")
    return out


def initialise_from(
    path: Path, components: dict[str, torch.nn.Module], prefixes: dict[str, str], sgm: tuple[str, ...] = ()
) -> int:
    """Copy a community (or peft/diffusers LoRA) file into the injected adapters of ``components``;
    return the number of layers set. Shapes (rank, LoKr factors) must match the technique's."""
    layers = load_layers(path, components, prefixes, sgm)
    adapted = {
        f"{component}.{p}": layer for component, module in components.items() for p, layer in adapter_layers(module)
    }
    missing = sorted(set(layers) - set(adapted))
    if missing:
        raise ConfigError(
            f"init_from: {path.name} adapts {missing[0]}, which this technique does not "
            f"({len(missing)} such layers); add it to target_modules, or train_text_encoder"
        )
    for where, tensors in layers.items():
        layer = adapted[where]
        for name, value in community_to_peft(layer, tensors, where).items():
            attribute, _, leaf = name.partition(".")
            holder = getattr(layer, attribute)[ADAPTER]
            target = getattr(holder, leaf) if leaf else holder
            target = target.weight if isinstance(target, torch.nn.Module) else target  # DoRA's magnitude layer
            if tuple(target.shape) != tuple(value.shape):
                raise ConfigError(
                    f"init_from: {where}.{name} is {tuple(value.shape)} in {path.name} but {tuple(target.shape)} "
                    "here; use the rank (and LoKr/LoHa options) the file was trained with"
                )
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
    return len(layers)


# -- who reads what ---------------------------------------------------------------------------------
KOHYA_TOOLS = ["A1111/Forge", "ComfyUI", "kohya sd-scripts", "LyCORIS"]
TOOLS = {  # technique kind → the tools that load its community file with the same weights
    "lora": [*KOHYA_TOOLS, "diffusers load_lora_weights"],
    # diffusers drops kohya dora_scale; A1111 normalises per input column, ComfyUI/Forge by the base weight
    "dora": ["LyCORIS"],
    "loha": KOHYA_TOOLS,
    "lokr": KOHYA_TOOLS,
    "partial": KOHYA_TOOLS,
}


def tools_reading(kind: str, family: str) -> list[str]:
    """The tools that read a technique's community file for this family (the README says which the
    tests run: LyCORIS for every kind and family, diffusers for LoRA)."""
    tools = list(TOOLS[kind])
    if export_facts(family).kohya_trainer_names_unet == "none":  # SD3: SimpleTuner's lycoris_ names (ComfyUI, LyCORIS)
        return [tool for tool in tools if tool in ("ComfyUI", "LyCORIS")]
    return tools
