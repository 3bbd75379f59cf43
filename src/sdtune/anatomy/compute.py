"""The anatomy of a trained model: each changed weight matrix's ΔW (:mod:`.maths`), grouped by where
it lives (the family's :meth:`sdtune.models.Model.layer_place`: blocks and kinds), into the typed
:class:`sdtune.records.Anatomy` every train record carries."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from sdtune.anatomy import maths
from sdtune.anatomy.layers import BaseWeight, WeightPair, changed_pairs, weight_norms
from sdtune.models import Model
from sdtune.records import Anatomy

METHOD = {
    "delta": "W_after − W_before in float64 from the saved float32 weights (adapters merged through peft on a "
             "float64 copy of each layer); singular values in float32 (float64 through the Gram matrix)",
    "matrices": "Linear and Conv weights (conv kernels flattened to (out, in·k·k)), Embedding tables transposed to "
                "(width, rows); biases and norms are not matrices and are left out",
    "spectrum": f"exact: singular values when the smaller side is ≤ {maths.EXACT_MAX_SIDE}, the float64 Gram "
                f"matrix's eigenvalues up to {maths.GRAM_MAX_SIDE}; beyond, the top {maths.RANK_CAP} from "
                f"torch.svd_lowrank (niter {maths.NITER}; exact for a ΔW of rank ≤ {maths.RANK_CAP})",
    "spectrum_top": maths.RANK_CAP, "exact_max_side": maths.GRAM_MAX_SIDE,
    "rank_tolerance": "σ > max(m, n) · eps(float32) · σ_max (numpy matrix_rank's default)",
    "effective_rank": "exp(entropy of σ_i / Σσ) (Roy & Vetterli 2007)",
    "intruders": {
        "k": maths.INTRUDER_TOP_K, "epsilon": maths.INTRUDER_EPSILON, "vectors": "left singular vectors (output space)",
        "definition": "top-k singular vectors of W_after whose max |cos| with every singular vector of W_before is "
                      "below epsilon (Shuttleworth et al. 2024, arXiv 2410.21228)",
    },
    "relative": "‖ΔW‖_F / ‖W_before‖_F; a group's over all its weight matrices, changed or not",
}


def layer_anatomy(pair: WeightPair, family: type[Model]) -> dict[str, Any]:
    """The anatomy of one changed matrix (see :mod:`.maths`); where it lives, as the family says."""
    delta = pair.after - pair.before
    block, kind = family.layer_place(pair.component, pair.path)
    entry: dict[str, Any] = {
        "name": pair.name, "block": block, "kind": kind, "module": pair.module, "adapted": pair.adapted,
        "shape": list(delta.shape), "frobenius": maths.frobenius_norm(delta),
        "weight_frobenius": maths.frobenius_norm(pair.before), "relative": maths.relative_norm(delta, pair.before),
    }
    if entry["frobenius"] == 0.0:  # an adapted layer that did not change: nothing to decompose
        return {**entry, "numerical_rank": 0, "rank_exact": True, "effective_rank": 0.0, "intruders": 0,
                "intruder_max_cosines": [], "intruders_exact": True}
    spectrum = maths.singular_values(delta)
    intruders = maths.intruder_dimensions(pair.before, pair.after)
    return {
        **entry, "numerical_rank": maths.numerical_rank(spectrum), "rank_exact": spectrum.exact,
        "effective_rank": maths.effective_rank(spectrum), "intruders": intruders.count,
        "intruder_max_cosines": list(intruders.max_cosines), "intruders_exact": intruders.exact,
    }


def group_summary(layers: list[dict[str, Any]], weight_squared: float, total_squared: float) -> dict[str, Any]:
    """A group's ΔW: ‖ΔW‖_F over its changed layers, relative to ‖W‖_F over *all* its matrices, its
    share of the whole change (of Σ‖ΔW‖²), and its layers' ranks and intruders."""
    changed = [layer for layer in layers if layer["frobenius"] > 0]
    squared = sum(layer["frobenius"] ** 2 for layer in layers)
    ranks = [layer["effective_rank"] for layer in changed]
    return {
        "layers": len(layers), "changed_layers": len(changed), "frobenius": math.sqrt(squared),
        "weight_frobenius": math.sqrt(weight_squared),
        "relative": math.sqrt(squared / weight_squared) if weight_squared > 0 else None,
        "share": squared / total_squared if total_squared > 0 else 0.0,
        "effective_rank_median": statistics.median(ranks) if ranks else 0.0,
        "effective_rank_mean": statistics.fmean(ranks) if ranks else 0.0,
        "numerical_rank_max": max((layer["numerical_rank"] for layer in layers), default=0),
        "intruders": sum(layer["intruders"] for layer in layers),
        "layers_with_intruders": sum(1 for layer in layers if layer["intruders"]),
    }


def summarise(
    layers: list[dict[str, Any]], sizes: Iterable[tuple[str, str, float]], family: type[Model], weights: str,
    seconds: float, device: str,
) -> Anatomy:
    """The :class:`Anatomy` of per-layer entries; ``sizes`` are (component, path, ‖W‖²) of every matrix
    of the model (a changed one counts with its W_before)."""
    before = {layer["name"]: layer["weight_frobenius"] ** 2 for layer in layers}
    size_of: dict[str, dict[str, float]] = {"blocks": {}, "kinds": {}}
    everything = 0.0
    for component, path, squared in sizes:
        squared = before.get(f"{component}.{path}", squared)
        block, kind = family.layer_place(component, path)
        size_of["blocks"][block] = size_of["blocks"].get(block, 0.0) + squared
        size_of["kinds"][kind] = size_of["kinds"].get(kind, 0.0) + squared
        everything += squared
    total_squared = sum(layer["frobenius"] ** 2 for layer in layers)
    groups = {}
    for axis, key in (("blocks", "block"), ("kinds", "kind")):
        names = list(dict.fromkeys([*size_of[axis], *(layer[key] for layer in layers)]))
        names = family.blocks_in_order(names) if axis == "blocks" else names
        groups[axis] = {
            name: group_summary([layer for layer in layers if layer[key] == name], size_of[axis].get(name, 0.0), total_squared)
            for name in names
        }
    return Anatomy(
        method=METHOD, weights=weights, total=group_summary(layers, everything, total_squared), blocks=groups["blocks"],
        kinds=groups["kinds"], layers=layers, time_s=seconds, device=device,
    )


@contextlib.contextmanager
def lapack_single_threaded() -> Iterator[None]:
    """One CPU thread for the SVDs: the matrices are small for LAPACK's threading, which on shared
    cores spins instead of working (measured on this project's 2-core machines under load: svdvals of
    a 256 × 2304 matrix 11.1 s with 2 threads, 0.17 s with 1; a 256 × 256 intruder test 3.3 s vs 0.05 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def anatomy_of_pairs(
    pairs: Iterator[WeightPair], components: dict[str, torch.nn.Module], family: type[Model], weights: str,
    progress: bool = False,
) -> Anatomy:
    """The anatomy of changed pairs against the matrices of ``components`` (the model they belong to)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    device = str(next((p.device for m in components.values() for p in m.parameters()), torch.device("cpu")))
    with lapack_single_threaded() if device == "cpu" else contextlib.nullcontext():
        layers = [layer_anatomy(pair, family) for pair in tqdm(pairs, desc="anatomy", unit="layer", disable=not progress)]
    return summarise(layers, weight_norms(components), family, weights, time.perf_counter() - started, device)


def model_anatomy(
    components: dict[str, torch.nn.Module], base_weight: BaseWeight, family: type[Model], weights: str,
    compare: Callable[[torch.nn.Module], bool] | None = None, progress: bool = False,
) -> Anatomy:
    """The anatomy of a trained model's ``components`` against the base (``base_weight``); ``compare``
    says which plain layers may have changed (default: all, compared with the base)."""
    started = time.perf_counter()
    anatomy = anatomy_of_pairs(changed_pairs(components, base_weight, compare), components, family, weights, progress)
    return dataclasses.replace(anatomy, time_s=time.perf_counter() - started)


def base_lookup(load: Callable[[], Any]) -> BaseWeight:
    """A :data:`BaseWeight` over a base model loaded on first use (``load()`` → a Model)."""
    loaded: list[Any] = []

    def weight(component: str, path: str) -> torch.Tensor | None:
        if not loaded:
            loaded.append(load())
        module = loaded[0].components.get(component)
        try:
            return module.get_submodule(path).weight.detach() if module is not None else None
        except AttributeError:
            return None

    return weight
