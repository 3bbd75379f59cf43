"""The figures of "What each technique changed", drawn from :mod:`sdtune.report.changes`: a heat map of
relative ΔW per block × technique, each technique's effective rank and intruder dimensions, and the
change against outcome metrics (drift, the style split) — techniques, or ``tune``'s trials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdtune.report.changes import ChangePoint, outcome_metrics
from sdtune.util import atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path) -> Path:
    atomic.save_figure(path, figure, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def block_heatmap(found: list[dict[str, Any]], path: Path) -> Path | None:
    """Relative ΔW of each block (‖ΔW‖_F / ‖W‖_F over all the block's matrices), log colour scale."""
    if not found:
        return None
    from matplotlib.colors import LogNorm

    blocks = list(dict.fromkeys(name for s in found for name in s["blocks"]))
    values = np.array([[s["blocks"].get(b, {}).get("relative") or np.nan for s in found] for b in blocks], dtype=float)
    values[values <= 0] = np.nan
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(1.3 + 1.1 * len(found), 0.8 + 0.38 * len(blocks)))
    finite = values[np.isfinite(values)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.min() < finite.max() else None
    image = axis.imshow(np.ma.masked_invalid(values), cmap="viridis", norm=norm, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        label = "0" if np.isnan(value) else f"{value:.2g}"
        axis.text(j, i, label, ha="center", va="center", fontsize=7, color="white" if np.isfinite(value) else "#888")
    axis.set_xticks(range(len(found)), [s["label"] for s in found], rotation=30, ha="right", fontsize=8)
    axis.set_yticks(range(len(blocks)), blocks, fontsize=8)
    figure.colorbar(image, ax=axis, label="relative ΔW (log)")
    return _save(plt, figure, path)


def ranks_and_intruders(found: list[dict[str, Any]], path: Path) -> Path | None:
    """Median effective rank of a changed matrix (with the largest numerical rank above each bar) and
    the intruder dimensions, per technique."""
    if not found:
        return None
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(2.5 + 1.6 * len(found), 3.4))
    labels = [s["label"] for s in found]
    ranks = [s["total"]["effective_rank_median"] for s in found]
    left.bar(range(len(found)), ranks, color="#5b8def")
    for i, s in enumerate(found):
        left.annotate(f"rank ≤ {s['total']['numerical_rank_max']:.0f}", (i, ranks[i]), ha="center", va="bottom", fontsize=7)
    left.set_title("median effective rank of ΔW\n(numerical rank: the largest, above)", fontsize=9)
    intruders = [s["total"]["intruders"] for s in found]
    right.bar(range(len(found)), intruders, color="#e8743b")
    for i, s in enumerate(found):
        right.annotate(f"{s['total']['layers_with_intruders']:.0f}/{s['total']['changed_layers']:.0f}",
                       (i, intruders[i]), ha="center", va="bottom", fontsize=7)
    method = found[0]["method"]["intruders"]
    right.set_title(f"intruder dimensions (k={method['k']}, ε={method['epsilon']})\n(matrices with any / changed, above)",
                    fontsize=9)
    right.set_ylim(0, max(1.0, 1.15 * max(intruders)))
    for axis in (left, right):
        axis.set_xticks(range(len(found)), labels, rotation=30, ha="right", fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(plt, figure, path)


def change_scatter(points: list[ChangePoint], path: Path) -> tuple[Path, str] | None:
    """Each run's change (relative ΔW; intruder dimensions) against the outcome metrics every run has
    (:data:`sdtune.report.changes.OUTCOMES`): techniques, or a technique's trials across learning
    rates (a kind with several runs is labelled by learning rate). Returns the figure and its title."""
    metrics = outcome_metrics(points)
    if not metrics or len(points) < 2:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(len(metrics), 2, figsize=(9, 3.4 * len(metrics)), squeeze=False)
    kinds = list(dict.fromkeys(p.kind for p in points))
    colours = {kind: plt.cm.tab10(i % 10) for i, kind in enumerate(kinds)}
    repeated = {kind for kind in kinds if sum(p.kind == kind for p in points) > 1}
    for row, metric in zip(axes, metrics):
        for axis, key, label in ((row[0], "relative", "relative ΔW (‖ΔW‖/‖W‖, all matrices)"),
                                 (row[1], "intruders", "intruder dimensions (all matrices)")):
            for index, point in enumerate(points):
                x, y = point.total.get(key) or 0.0, point.metrics[metric]
                axis.scatter(x, y, color=colours[point.kind], s=36)
                name = f"{point.label} lr={point.learning_rate:g}" if point.kind in repeated and point.learning_rate else point.label
                # labels staggered vertically: runs at the same x (no intruders) would print over each other
                axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4 - 9 * (index % 3)), fontsize=7)
            if key == "relative":
                from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

                axis.set_xscale("log")
                axis.xaxis.set_major_formatter(LogFormatterSciNotation())
                axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_xlabel(label, fontsize=8)
            axis.set_ylabel(metric, fontsize=8)
            axis.grid(alpha=0.3)
    figure.tight_layout()
    title = (f"Change against outcome ({', '.join(metrics)}: the final models' eval records; one point per run"
             + ("" if "drift" in metrics else "; drift was not measured") + ")")
    return _save(plt, figure, path), title
