"""Figures of the tuning report (matplotlib, Agg backend), from the selection record and the final
runs' rows: each technique's sensitivity to its learning rate, and fidelity vs drift (the Pareto view
of peft's image-generation benchmark and of Biderman et al. 2024, "LoRA Learns Less and Forgets Less":
learning more against forgetting more)."""

from __future__ import annotations

from pathlib import Path

from sdtune.report import change_plots
from sdtune.report.changes import change_points
from sdtune.report.format import rate
from sdtune.report.summary import BASE, metric_names, metric_summary
from sdtune.report.tuning_summary import Study
from sdtune.util import atomic

FIDELITY = ("dino", "fidelity", "clip_i")  # learning the data: closeness of in-domain images to real ones
DRIFT = ("drift", "preservation")  # forgetting: how far out-of-domain images moved from the base model's


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def all_figures(study: Study, folder: Path) -> list[tuple[str, Path]]:
    figures = []
    select_by = study.selection.tuning["select_by"]
    path = sensitivity(study, folder)
    if path:
        figures.append((f"Sensitivity: {select_by} on the validation split vs learning rate (★ the chosen rate)", path))
    pair = pareto_metrics(study)
    path = pareto(study, folder, pair) if pair else None
    if path and pair:
        figures.append((f"Fidelity ({pair[0]}) vs drift ({pair[1]}): every technique at both learning rates "
                        "(the line joins the models no other beats on both)", path))
    scatter = change_across_rates(study, folder)
    if scatter:
        figures.append((f"What each technique changed, across learning rates: {scatter[1]}", scatter[0]))
    return figures


def change_across_rates(study: Study, folder: Path) -> tuple[Path, str] | None:
    """The anatomy of every final run (each technique at the shared and at its tuned learning rate)
    against its outcome metrics: :func:`sdtune.report.change_plots.change_scatter`, one point per run
    and rate (a run both arms share, linked rather than retrained: once)."""
    points, seen = [], set()
    for rows in study.arms.values():  # (paired within an arm: the same label and seed exist in both)
        train = []
        for record in (record for row in rows for record in row.train):
            key = (record.technique.get("name"), (record.train or {}).get("learning_rate"), record.seeds.get("train"))
            if key not in seen:
                seen.add(key)
                train.append(record)
        points += change_points(train, [e for row in rows for e in row.evals])
    return change_plots.change_scatter(points, folder / "change_across_rates.png")


def sensitivity(study: Study, folder: Path) -> Path | None:
    """Each technique's selection score against its learning rates (log x); the chosen point starred, the
    base model's validation loss (every trial's step 0) dashed."""
    techniques = {n: e for n, e in study.selection.techniques.items() if any(t.get("score") is not None for t in e["trials"])}
    if not techniques:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, entry in techniques.items():
        points = [(t["learning_rate"], t["score"]) for t in entry["trials"] if t.get("score") is not None]
        line = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)[0]
        chosen = next((p for p in points if p[0] == entry.get("chosen_learning_rate")), None)
        if chosen:
            axis.scatter([chosen[0]], [chosen[1]], marker="*", s=220, color=line.get_color(), edgecolors="black", zorder=3)
        start = entry.get("start_validation_loss")
        if start is not None and study.selection.tuning["select_by"] == "validation_loss":
            axis.axhline(start, linestyle="--", linewidth=0.8, color=line.get_color(), alpha=0.6)
    axis.set_xscale("log")
    axis.set_xlabel("learning rate (log scale)")
    axis.set_ylabel(f"{study.selection.tuning['select_by']} ({study.selection.tuning['direction']} is better)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, which="both")
    return _save(plt, figure, folder / "sensitivity.png")


def pareto_metrics(study: Study) -> tuple[str, str] | None:
    """``tuning.pareto``, else the first fidelity and the first drift metric measured."""
    chosen = study.selection.tuning.get("pareto")
    if chosen:
        return chosen[0], chosen[1]
    rows = [row for rows in study.arms.values() for row in rows]
    numeric, _ = metric_names(rows)
    fidelity = next((m for m in FIDELITY if m in numeric), None)
    drift = next((m for m in DRIFT if m in numeric), None)
    return (fidelity, drift) if fidelity and drift else None


def _direction(study: Study, name: str) -> str:
    """The metric's better direction as recorded; an informational one (a share of images, "none") reads
    as more is more."""
    for rows in study.arms.values():
        for row in rows:
            for record in row.evals:
                if record.metrics.get(name, {}).get("direction") in ("higher", "lower"):
                    return record.metrics[name]["direction"]
    return "higher"


def pareto_front(points: list[tuple[str, float, float]], x_direction: str, y_direction: str) -> list[str]:
    """The labels of the points no other point beats on both axes (each axis with its direction)."""
    def better_or_equal(a: float, b: float, direction: str) -> bool:
        return a <= b if direction == "lower" else a >= b

    front = []
    for label, x, y in points:
        dominated = any(
            better_or_equal(ox, x, x_direction) and better_or_equal(oy, y, y_direction) and (ox, oy) != (x, y)
            for other, ox, oy in points if other != label
        )
        if not dominated:
            front.append(label)
    return front


def pareto(study: Study, folder: Path, pair: tuple[str, str]) -> Path | None:
    fidelity, drift = pair
    points, base = [], None
    for arm, rows in study.arms.items():
        for row in rows:
            x, y = metric_summary(row, drift), metric_summary(row, fidelity)
            if not (x and y and "value" in x and "value" in y):
                continue
            if row.label == BASE:
                base = (x["value"], y["value"])
            else:
                points.append((f"{row.label} @{rate(study.rate(arm, row.label))}", x["value"], y["value"]))
    points = list({label: (label, x, y) for label, x, y in points}.values())  # a rate in both arms: once
    if not points:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    front = set(pareto_front(points, _direction(study, drift), _direction(study, fidelity)))
    for label, x, y in points:
        axis.scatter([x], [y], s=40, color="#d62728" if label in front else "#5b8def")
    line = sorted((x, y) for label, x, y in points if label in front)
    axis.plot([p[0] for p in line], [p[1] for p in line], color="#d62728", linewidth=1, alpha=0.7)
    if base:
        axis.scatter([base[0]], [base[1]], marker="s", color="black", s=40)
    for (x, y), text in point_labels(points, base).items():
        axis.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, va="bottom")
    axis.set_xlabel(f"{drift} ({_direction(study, drift)} is better: forgets less)")
    axis.set_ylabel(f"{fidelity} ({_direction(study, fidelity)} is better: learns more)")
    axis.grid(alpha=0.3)
    return _save(plt, figure, folder / "pareto.png")


def point_labels(points: list[tuple[str, float, float]], base: tuple[float, float] | None) -> dict[tuple[float, float], str]:
    """One label per place on the plot: the models that sit on the same point (e.g. every adapter that
    learned nothing at the shared rate, and the base) are listed together, one per line."""
    at: dict[tuple[float, float], list[str]] = {}
    if base:
        at.setdefault(base, []).append("base")
    for label, x, y in points:
        at.setdefault((x, y), []).append(label)
    return {place: "\n".join(labels) for place, labels in at.items()}


def _save(plt, figure, path: Path) -> Path:
    atomic.save_figure(path, figure, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
