"""Figures of the report (matplotlib, Agg backend) and the image grid (PIL), drawn from the
numbers of :mod:`sdtune.report.summary`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdtune.report.summary import (
    BASE,
    Row,
    base_row,
    curve_metrics,
    metric_names,
    metric_summary,
    quality_curve,
    study_table,
    validation_curve,
)
from sdtune.util import atomic

GRID_CELL = 128  # pixels per image in the grid (small images are upscaled without smoothing)
QUALITY_PREFERENCE = ("clip_score", "fidelity", "preservation")  # when the experiment lists no metrics


def all_figures(rows: list[Row], root: Path, folder: Path) -> list[tuple[str, Path]]:
    figures = []
    grid = image_grid(rows, root, folder / "grid.png")
    if grid:
        figures.append(("Images: rows = prompt × seed, columns = models (same noise across a row)", grid))
    for title, function in (
        ("Training loss", loss_curves),
        ("Validation loss over training (held-out images, fixed timesteps and noise; 95 % CI across training seeds)",
         validation_curves),
        ("Quality over training steps (95 % CI across training seeds)", quality_curves),
        ("Quality metrics (95 % CI)", metric_bars),
        ("Size on disk vs quality", tradeoff),
    ):
        path = function(rows, folder)
        if path:
            figures.append((title, path))
    return figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(rows: list[Row], root: Path, path: Path) -> Path | None:
    """One column per model (first training seed), one row per (prompt, seed)."""
    columns = [(row.label, row.evals[0]) for row in rows if row.evals]
    if not columns:
        return None
    keys = [(e["prompt"], e["seed"]) for e in columns[0][1].images]
    try:
        font = ImageFont.load_default(size=14)  # Pillow ≥ 10.1: a scalable font
    except TypeError:
        font = ImageFont.load_default()
    label_width, header = 260, 28
    grid = Image.new("RGB", (label_width + GRID_CELL * len(columns), header + GRID_CELL * len(keys)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, _) in enumerate(columns):
        draw.text((label_width + c * GRID_CELL + 4, 6), label[:16], fill="black", font=font)
    for r, (prompt, seed) in enumerate(keys):
        draw.text((4, header + r * GRID_CELL + GRID_CELL // 2 - 8), f"{prompt[:28]} (seed {seed})", fill="black", font=font)
        for c, (_, record) in enumerate(columns):
            match = next((e for e in record.images if (e["prompt"], e["seed"]) == (prompt, seed)), None)
            if match is None or not (root / match["path"]).exists():
                continue
            image = Image.open(root / match["path"]).convert("RGB")
            resample = Image.NEAREST if image.width < GRID_CELL else Image.LANCZOS
            grid.paste(image.resize((GRID_CELL, GRID_CELL), resample), (label_width + c * GRID_CELL, header + r * GRID_CELL))
    atomic.save_image(path, grid)
    return path


def loss_curves(rows: list[Row], folder: Path) -> Path | None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for row in rows:
        for record in row.train:
            history = record.loss_history or []
            if history:
                steps = [h["step"] for h in history]
                label = f"{row.label} (seed {record.seeds['train']})" if len(row.train) > 1 else row.label
                axis.plot(steps, _smooth([h["loss"] for h in history]), label=label)
                drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (moving average)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(plt, figure, folder / "loss.png")


def _smooth(values: list[float], window: int = 10) -> np.ndarray:
    values_array = np.asarray(values, dtype=float)
    if len(values_array) < window:
        return values_array
    kernel = np.ones(window) / window
    head = [values_array[: i + 1].mean() for i in range(window - 1)]
    return np.concatenate([head, np.convolve(values_array, kernel, mode="valid")])


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _curve(axis, points: list[dict], label: str) -> None:
    steps = [p["step"] for p in points]
    values = np.array([p["value"] for p in points])
    line = axis.plot(steps, values, marker="o", markersize=3, label=label)[0]
    low = np.array([p["low"] if p.get("low") is not None else p["value"] for p in points])
    high = np.array([p["high"] if p.get("high") is not None else p["value"] for p in points])
    if np.any(high > low):
        axis.fill_between(steps, low, high, alpha=0.2, color=line.get_color())


def validation_curves(rows: list[Row], folder: Path) -> Path | None:
    """Validation loss against optimizer steps, one line per technique, CI band across seeds."""
    curves = [(row.label, validation_curve(row)) for row in rows if row.label != BASE]
    curves = [(label, points) for label, points in curves if points]
    if not curves:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for label, points in curves:
        _curve(axis, points, label)
    axis.set_xlabel("optimizer step")
    axis.xaxis.set_major_locator(_integer_locator())
    axis.set_ylabel("validation loss")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(plt, figure, folder / "validation_loss.png")


def quality_curves(rows: list[Row], folder: Path) -> Path | None:
    """Each metric measured at several steps against optimizer steps, one line per technique."""
    names = curve_metrics(rows)
    if not names:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    base = base_row(rows)
    for axis, name in zip(axes[0], names):
        for row in rows:
            points = quality_curve(row, name, base) if row.label != BASE else []
            if points:
                _curve(axis, points, row.label)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("optimizer step (0: the base model)", fontsize=8)
        axis.xaxis.set_major_locator(_integer_locator())
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return _save(plt, figure, folder / "quality_over_steps.png")


def metric_bars(rows: list[Row], folder: Path) -> Path | None:
    numeric, _ = metric_names(rows)
    summaries = {m: [(row.label, metric_summary(row, m)) for row in rows] for m in numeric}
    summaries = {m: [(label, s) for label, s in items if s and "value" in s] for m, items in summaries.items()}
    summaries = {m: items for m, items in summaries.items() if items}
    if not summaries:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(summaries), figsize=(3.2 * len(summaries), 3.6), squeeze=False)
    for axis, (name, items) in zip(axes[0], summaries.items()):
        labels = [label for label, _ in items]
        values = np.array([s["value"] for _, s in items])
        low = np.array([s["low"] if s.get("low") is not None else s["value"] for _, s in items])
        high = np.array([s["high"] if s.get("high") is not None else s["value"] for _, s in items])
        axis.bar(range(len(labels)), values, yerr=[values - low, high - values], capsize=3, color="#5b8def")
        axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        axis.set_title(name, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(plt, figure, folder / "metrics.png")


def tradeoff(rows: list[Row], folder: Path) -> Path | None:
    quality = headline_metric(rows)
    if quality is None:
        return None
    sizes = {e["model"]: e.get("adapter") or sum(e.get(p) or 0 for p in ("denoiser", "vae", "text_encoders")) for e in study_table(rows)}
    points = [(row.label, sizes.get(row.label), metric_summary(row, quality)) for row in rows]
    points = [(label, size, s["value"]) for label, size, s in points if size and s and "value" in s]
    if not points:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, size, value in points:
        axis.scatter(size / 1e6, value, s=40)
        axis.annotate(label, (size / 1e6, value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("bytes on disk (MB, log scale)")
    axis.set_ylabel(quality)
    axis.grid(alpha=0.3)
    return _save(plt, figure, folder / "tradeoff.png")


def headline_metric(rows: list[Row]) -> str | None:
    """The quality metric the size trade-off is drawn against: the first higher-is-better metric the
    experiment lists (``evaluation.metrics``), else the first of :data:`QUALITY_PREFERENCE` measured,
    else the first numeric metric."""
    numeric, _ = metric_names(rows)
    listed = next((list((r.config.get("evaluation") or {}).get("metrics") or []) for row in rows for r in row.evals), [])
    higher = {name for row in rows for r in row.evals for name, entry in r.metrics.items() if entry.get("direction") == "higher"}
    for name in [*listed, *QUALITY_PREFERENCE]:
        if name in numeric and name in higher:
            return name
    return numeric[0] if numeric else None


def _save(plt, figure, path: Path) -> Path:
    atomic.save_figure(path, figure, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
