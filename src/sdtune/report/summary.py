"""The report's numbers, computed from records only: rows, metric summaries, the study table and the
curves over training steps. :mod:`sdtune.report.render` formats them and :mod:`sdtune.report.plots` draws them;
both import this module and neither imports the other's callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdtune.metrics.maths import bootstrap_ci
from sdtune.records import EvalRecord, TrainRecord, check_failed

BASE = "base"


@dataclass
class Row:
    """One model of the comparison (the base model, or a technique over its training seeds).

    ``evals`` are the finished models' eval records (one per training seed); ``steps`` the eval
    records of the models evaluated during training (``evaluation.every_steps``)."""

    label: str
    kind: str
    status: str = "finished"
    error: str | None = None
    check_failed: bool = False  # a run of it did not train what it claims (checks.trained)
    train: list[TrainRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    steps: list[EvalRecord] = field(default_factory=list)


def build_rows(train: list[TrainRecord], evals: list[EvalRecord]) -> list[Row]:
    """One row per model, in the experiment's technique order (the base model first)."""
    rows: dict[str, Row] = {}
    for record in evals:
        if record.label == BASE:
            rows.setdefault(BASE, Row(BASE, "base model")).evals.append(record)
    for record in train:
        name = record.technique["name"]
        row = rows.setdefault(name, Row(name, record.technique["kind"]))
        row.train.append(record)
        row.check_failed = row.check_failed or check_failed(record)
        if record.status != "finished":
            row.status, row.error = record.status, record.error
    for record in evals:
        if record.label != BASE and record.label in rows:
            final = _is_final(record, rows[record.label])
            (rows[record.label].evals if final else rows[record.label].steps).append(record)
    order = [BASE, *((train[0].config or {}).get("techniques") or {} if train else {})]
    return sorted(rows.values(), key=lambda row: order.index(row.label) if row.label in order else len(order))


def _is_final(record: EvalRecord, row: Row) -> bool:
    """A technique's eval record is of its finished model unless its step is an earlier one of its run."""
    run = next((t for t in row.train if t.seeds.get("train") == record.train_seed), None)
    done = (run.steps or {}).get("done") if run else None
    return record.step is None or done is None or record.step >= done


def metric_names(rows: list[Row]) -> tuple[list[str], list[str]]:
    """(numeric metrics, share-valued metrics) that appear in any evaluation."""
    numeric: list[str] = []
    shares: list[str] = []
    for row in rows:
        for record in row.evals:
            for name, entry in record.metrics.items():
                value = entry.get("value")
                target = shares if isinstance(value, dict) else numeric
                if (value is not None or entry.get("skipped")) and name not in numeric + shares:
                    target.append(name)
    return numeric, shares


def summarise(entries: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Mean and 95 % CI of one metric over eval records: bootstrap over training seeds when there
    are several, else the metric's own CI over images; ``{"skipped": reason}`` when it was skipped."""
    values = [e["value"] for e in entries if e and isinstance(e.get("value"), (int, float))]
    if not values:
        skipped = next((e.get("skipped") for e in entries if e and e.get("skipped")), None)
        return {"skipped": skipped} if skipped else None
    if len(values) > 1:
        mean, low, high = bootstrap_ci(np.asarray(values, dtype=float))
        return {"value": mean, "low": low, "high": high, "n": len(values), "over": "training seeds"}
    details = next(e for e in entries if e and isinstance(e.get("value"), (int, float))).get("details") or {}
    low, high = details.get("ci_low"), details.get("ci_high")
    return {"value": values[0], "low": low, "high": high, "n": details.get("n"), "over": "images"}


def metric_summary(row: Row, name: str) -> dict[str, Any] | None:
    """Mean and 95 % CI of a metric of the row's finished models (see :func:`summarise`)."""
    return summarise([r.metrics.get(name) for r in row.evals if name in r.metrics])


def share_summary(row: Row, name: str) -> dict[str, float] | None:
    found = [r.metrics[name]["value"] for r in row.evals if isinstance(r.metrics.get(name, {}).get("value"), dict)]
    if not found:
        return None
    labels = list(found[0])
    return {label: float(np.mean([f.get(label, 0.0) for f in found])) for label in labels}


def quality_curve(row: Row, name: str, base: Row | None = None) -> list[dict[str, Any]]:
    """A metric over training steps: ``[{step, value, low, high, n, over}]``, every evaluated step
    (the finished model's at its last step), CIs across training seeds where there are several.
    With the ``base`` row, its value is step 0: every technique starts as the base model (adapters
    are initialised to leave it unchanged)."""
    by_step: dict[int, list[dict | None]] = {}
    for record in [*(base.evals if base else []), *row.steps, *row.evals]:
        step = 0 if record.label == BASE else record.step
        if step is not None and name in record.metrics:
            by_step.setdefault(step, []).append(record.metrics[name])
    points = []
    for step in sorted(by_step):
        summary = summarise(by_step[step])
        if summary and "value" in summary:
            points.append({"step": step, **summary})
    return points


def validation_curve(row: Row) -> list[dict[str, Any]]:
    """The validation loss over training steps, mean and 95 % bootstrap CI across training seeds."""
    by_step: dict[int, list[float]] = {}
    for record in row.train:
        for entry in record.evaluation:
            if entry.get("validation_loss") is not None:
                by_step.setdefault(entry["step"], []).append(entry["validation_loss"])
    points = []
    for step in sorted(by_step):
        values = np.asarray(by_step[step], dtype=float)
        if len(values) > 1:
            mean, low, high = bootstrap_ci(values)
        else:
            mean, low, high = float(values[0]), None, None
        points.append({"step": step, "value": mean, "low": low, "high": high, "n": len(values)})
    return points


def curve_metrics(rows: list[Row]) -> list[str]:
    """The numeric metrics measured during training of some technique (worth a curve)."""
    numeric, _ = metric_names(rows)
    return [m for m in numeric if any(r.steps and any(m in e.metrics for e in r.steps) for r in rows)]


def base_row(rows: list[Row]) -> Row | None:
    return next((row for row in rows if row.label == BASE), None)


def final_validation_loss(row: Row) -> dict[str, Any] | None:
    curve = validation_curve(row)
    return curve[-1] if curve else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def study_table(rows: list[Row]) -> list[dict[str, Any]]:
    """The study's table: sizes on disk, parameters, training and generation costs."""
    base_eval = next((r.evals[0] for r in rows if r.label == BASE and r.evals), None)
    base_sizes = (base_eval.base_sizes if base_eval else None) or {}
    base_params = (base_eval.base_parameters if base_eval else None) or {}
    table = []
    for row in rows:
        status = f"{row.status} · check FAILED" if row.check_failed else row.status
        entry: dict[str, Any] = {"model": row.label, "kind": row.kind, "status": status}
        if row.label == BASE:  # files on disk, else fp32 parameter bytes
            sizes = {part: base_sizes.get(part) or 4 * count for part, count in base_params.items()} or base_sizes
            entry.update(component_columns(sizes))
            entry["total_params"] = sum(base_params.values()) if base_params else None
        finished = [t for t in row.train if t.status == "finished"]
        if finished:
            outputs = finished[0].outputs
            entry.update(component_columns({part: value.get("bytes") for part, value in outputs.items()}))
            adapter = outputs.get("diffusers_lora") or outputs.get("adapter") or outputs.get("partial")
            entry["adapter"] = adapter["bytes"] if adapter else None
            params = finished[0].parameters or {}
            entry["trainable_params"] = params.get("trainable")
            entry["total_params"] = sum((params.get("components") or {}).values())
            entry["train_time_s"] = _mean([t.timing["train_time_s"] for t in finished])
            entry["s_per_step"] = _mean([t.timing["s_per_step"] for t in finished])
            entry["images_per_s"] = _mean([t.timing["images_per_s"] for t in finished])
            entry["peak_memory"] = _mean([t.memory["peak"]["bytes"] for t in finished])
            entry["memory_kind"] = finished[0].memory["peak"]["kind"]
        if row.evals:
            entry["load_time_s"] = _mean([e.generation["load_time_s"] for e in row.evals if e.generation])
            entry["s_per_image"] = _mean([e.generation["latency_s_mean"] for e in row.evals if e.generation])
        table.append(entry)
    return table


def component_columns(sizes: dict[str, int | None]) -> dict[str, int | None]:
    """Bytes per component grouped as the study's table shows them: the denoiser (UNet or
    transformer), the VAE, and all text encoders together (None where nothing was written)."""

    def total(names: list[str]) -> int | None:
        values = [sizes[name] for name in names if sizes.get(name) is not None]
        return sum(values) if values else None

    return {
        "denoiser": total([n for n in sizes if n in ("unet", "transformer")]),
        "vae": total(["vae"]),
        "text_encoders": total([n for n in sizes if n.startswith("text_encoder")]),
    }
