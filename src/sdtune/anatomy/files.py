"""ΔW of a LoRA/LyCORIS file people bring (kohya, ComfyUI, A1111, LyCORIS naming, or a diffusers/peft
LoRA file), layer by layer, without a trainer: the file's tensors (:func:`sdtune.formats.community.load_layers`
reads every naming ``init_from`` reads) turned into the weight change each loader applies, with peft's
own products for LoHa and LoKr (``make_weight``/``make_weight_cp``, ``make_kron``):

- LoRA/LoCon: ΔW = (alpha / rank) · up · down (rank = ``lora_down`` rows; no ``alpha``: scale 1);
- LoHa: ΔW = (alpha / rank) · (w1_a w1_b) ⊙ (w2_a w2_b) (Tucker cores ``hada_t1/t2`` for convs);
- LoKr: ΔW = scale · w1 ⊗ w2, each side whole or a product of factors (scale alpha / rank when a side
  is factorised, else 1, as every loader does);
- DoRA (``dora_scale``): W_after = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output row (LyCORIS ``wd_on_out``, peft's norm);
- full-rank differences (``diff``): ΔW = diff.

The tests check each against peft's merge of the same adapter (sdtune writes these files from its runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from sdtune.anatomy.layers import WeightPair, matrix_of
from sdtune.errors import UserError
from sdtune.formats import community
from sdtune.formats.families import export_facts

Tensors = dict[str, torch.Tensor]
ONE_DIMENSIONAL = ("diff_b", "w_norm", "b_norm")  # biases and norm scales: not matrices


class UnreadableLayerError(UserError, ValueError):
    """A layer of a file whose tensors name no method sdtune knows how to turn into ΔW."""


def _scale(tensors: Tensors, rank: int | None) -> float:
    alpha = tensors.get("alpha")
    return 1.0 if alpha is None or rank is None else float(alpha) / rank


def lora_delta(tensors: Tensors, shape: torch.Size) -> torch.Tensor:
    down, up = tensors["lora_down.weight"].double(), tensors["lora_up.weight"].double()
    return (_scale(tensors, down.shape[0]) * (up.flatten(1) @ down.flatten(1))).reshape(shape)


def loha_delta(tensors: Tensors, shape: torch.Size) -> torch.Tensor:
    from peft.tuners.loha.layer import make_weight, make_weight_cp

    t = {key: value.double() for key, value in tensors.items()}
    scale = torch.tensor(_scale(tensors, t["hada_w1_b"].shape[0]), dtype=torch.float64)
    if "hada_t1" in t:
        weight = make_weight_cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"], t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"], scale)
    else:
        weight = make_weight(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], scale)
    return weight.reshape(shape)


def lokr_delta(tensors: Tensors, shape: torch.Size) -> torch.Tensor:
    from peft.tuners.lokr.layer import make_kron
    from peft.tuners.lokr.layer import make_weight_cp as lokr_cp

    t = {key: value.double() for key, value in tensors.items()}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = lokr_cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank_side = t.get("lokr_w1_b", t.get("lokr_w2_b"))
    return make_kron(w1, w2, _scale(tensors, None if rank_side is None else rank_side.shape[0])).reshape(shape)


def layer_after(tensors: Tensors, weight: torch.Tensor, where: str) -> torch.Tensor | None:
    """W_after (float64) of one layer of the file applied to ``weight``; None for a layer with only
    1-D tensors (biases, norms)."""
    weight = weight.detach().double()
    if "lora_down.weight" in tensors:
        delta = lora_delta(tensors, weight.shape)
    elif "hada_w1_a" in tensors:
        delta = loha_delta(tensors, weight.shape)
    elif "lokr_w1" in tensors or "lokr_w1_a" in tensors:
        delta = lokr_delta(tensors, weight.shape)
    elif "diff" in tensors:
        delta = tensors["diff"].double().reshape(weight.shape)
    elif set(tensors) <= {*ONE_DIMENSIONAL, "alpha"}:
        return None
    else:
        raise UnreadableLayerError(
            f"{where}: tensors {', '.join(sorted(tensors))} are no LoRA, LoHa, LoKr, DoRA or diff layer sdtune reads"
        )
    if "dora_scale" not in tensors:
        return weight + delta
    combined = weight + delta
    norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return tensors["dora_scale"].double().reshape(norm.shape) * combined / norm


def file_kind(layers: dict[str, Tensors]) -> str:
    """The method of a file ("lora", "dora", "loha", "lokr", or "partial" for ``diff`` layers)."""
    names = {name for tensors in layers.values() for name in tensors}
    return next((kind for marker, kind in community.FILE_KINDS if any(n.startswith(marker) for n in names)), "partial")


def file_pairs(path: Path, components: dict[str, torch.nn.Module], family: str) -> tuple[Iterator[WeightPair], str]:
    """(W_before, W_after) of every layer the file changes, on the base ``components``; and its kind."""
    facts = export_facts(family)
    layers = community.load_layers(path, components, facts.community_prefixes, facts.sgm_components, what="anatomy")

    def pairs() -> Iterator[WeightPair]:
        for name, tensors in layers.items():
            component, _, module_path = name.partition(".")
            module = components[component].get_submodule(module_path)
            after = layer_after(tensors, module.weight, name)
            if after is not None:
                kind = type(module).__name__
                yield WeightPair(component, module_path, kind, matrix_of(module, module.weight), matrix_of(module, after), True)

    return pairs(), file_kind(layers)
