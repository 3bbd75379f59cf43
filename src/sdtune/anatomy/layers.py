"""The weight matrices a technique changed, as (W_before, W_after) pairs in float64.

One walk over a trained model's components serves every technique:

- a peft adapter layer (LoRA, LoCon, DoRA, LoHa, LoKr, OFT, BOFT) is merged *through peft* on a
  float64 copy of that one layer (``merge()``, as ``export --merged`` folds adapters in): W_before is
  its base weight, W_after the merged one. Merging in float32 would round W + ΔW to float32, a noise
  of ~1e-7·|W| per element that hides a small ΔW's rank; in float64 the merge is exact to ~1e-16;
- a module that says what it changed (``weights_before_and_after()``: textual inversion's token table)
  gives its own pair;
- any other Linear, Conv or Embedding whose weight differs from the base model's at the same path
  (full and partial fine-tuning, a text encoder trained fully) is a pair with the base weight.

Pairs are 2-D (:func:`sdtune.anatomy.maths.as_matrix`; embeddings transposed to (width, rows), so
that left singular vectors live in the space the layer writes to) and are yielded one at a time:
at most one layer's copies are alive at once.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sdtune.anatomy.maths import as_matrix
from sdtune.models.quantize import dequantized_linear, is_quantized_parameter

WEIGHTED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
BaseWeight = Callable[[str, str], "torch.Tensor | None"]  # (component, module path) → the base model's weight


@dataclass(frozen=True)
class WeightPair:
    """One changed weight matrix: ``component``, module ``path``, the module type, and W_before /
    W_after as 2-D float64 matrices (``adapted``: a peft adapter layer, merged)."""

    component: str
    path: str
    module: str
    before: torch.Tensor
    after: torch.Tensor
    adapted: bool

    @property
    def name(self) -> str:
        return f"{self.component}.{self.path}"


def matrix_of(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The 2-D float64 matrix of a layer's weight (embeddings transposed: (width, rows))."""
    weight = weight.detach().double()
    return weight.T if isinstance(module, torch.nn.Embedding) else as_matrix(weight)


def is_table(module: torch.nn.Module) -> bool:
    """A module that says what it changed (textual inversion's token table)."""
    return hasattr(module, "weights_before_and_after")


def _covered(component: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], tuple[str, ...]]:
    """The adapter layers of a component, and the prefixes of what lies inside them or inside a table."""
    adapted = dict(adapter_layers(component))
    tables = [path for path, layer in component.named_modules() if is_table(layer)]
    return adapted, tuple(f"{parent}." for parent in [*adapted, *tables])


def adapter_layers(component: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(path, layer) of every peft tuner layer that carries an adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, layer in component.named_modules():
        if isinstance(layer, BaseTunerLayer) and getattr(layer, "active_adapters", None):
            yield path, layer


def merged_pair(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_before, W_after) of a peft layer: its base weight, and the weight peft merges the adapter
    into, both computed on a float64 copy of the layer (the model is left as it is). On a quantised
    base (nf4/int8) the copy's base is the dequantised weight the layer computed with, merged by
    peft's plain-layer code (its bitsandbytes layers would quantise the float64 result again)."""
    with torch.no_grad():
        quantized = is_quantized_parameter(layer.get_base_layer().weight)
        merged = copy.deepcopy(layer)
        if quantized:
            merged.base_layer = dequantized_linear(merged.get_base_layer(), torch.float64)
            if hasattr(merged, "quantization_backend"):  # (OFT, BOFT: they dequantise through it; plain now)
                merged.quantization_backend = None
        # one device for the copy: the adapter's (under train.block_swap the base weight waits on the CPU)
        adapter = next((p for n, p in merged.named_parameters() if not n.startswith("base_layer")), None)
        merged = merged.to(device=adapter.device if adapter is not None else None, dtype=torch.float64)
        before = merged.get_base_layer().weight.detach().clone()
        _plain_merge(type(layer))(merged)
        return before, merged.get_base_layer().weight.detach()


def _plain_merge(layer_type: type) -> Callable[[torch.nn.Module], None]:
    """peft's merge for a layer of ``layer_type`` on a plain ``torch.nn.Linear`` base: its own, or for
    the bitsandbytes variants (``peft.tuners.<tuner>.bnb``) the tuner's plain ``Linear``'s."""
    module = layer_type.__module__
    if not module.endswith(".bnb"):
        return layer_type.merge
    return importlib.import_module(module.removesuffix(".bnb") + ".layer").Linear.merge


def changed_pairs(
    components: dict[str, torch.nn.Module], base_weight: BaseWeight,
    compare: Callable[[torch.nn.Module], bool] | None = None,
) -> Iterator[WeightPair]:
    """Every changed weight matrix of ``components`` (see the module docstring); ``base_weight``
    gives the base model's weight at a path (None: the base has no such layer); ``compare`` says
    which plain layers may have changed at all (in training: those whose weight trained)."""
    for component, module in components.items():
        adapted, inside = _covered(module)
        for path, layer in module.named_modules():
            if path.startswith(inside):
                continue  # inside an adapter layer (its base layer, the adapter's tensors) or a table
            kind = type(layer).__name__
            if path in adapted:
                before, after = merged_pair(layer)
                base = layer.get_base_layer()
                yield WeightPair(component, path, type(base).__name__, matrix_of(base, before), matrix_of(base, after), True)
            elif is_table(layer):
                before, after = layer.weights_before_and_after()
                yield WeightPair(component, path, kind, before.T, after.T, False)
            elif isinstance(layer, WEIGHTED) and path and (compare is None or compare(layer)):
                base = base_weight(component, path)
                weight = layer.weight.detach()
                if base is None or base.shape != weight.shape or torch.equal(base.to(weight), weight):
                    continue
                yield WeightPair(component, path, kind, matrix_of(layer, base.to(weight.device)), matrix_of(layer, weight), False)


def weight_norms(components: dict[str, torch.nn.Module]) -> Iterator[tuple[str, str, float]]:
    """(component, path, ‖W‖_F²) of every weight matrix, changed or not: the size of each block,
    against which its change is measured."""
    for component, module in components.items():
        adapted, inside = _covered(module)
        for path, layer in module.named_modules():
            if path.startswith(inside) or not path:
                continue
            target = layer.get_base_layer() if path in adapted else layer
            if is_table(layer):
                target = layer.original
            if isinstance(target, WEIGHTED) and not target.weight.is_meta:
                # (meta: an encoder train.free_encoders parked on the tests' fake split has no values)
                yield component, path, float(target.weight.detach().double().square().sum())
