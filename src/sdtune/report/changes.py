""""What each technique changed": the numbers of the report's section, from the records only — each
technique's anatomy (``anatomy`` of its train records), the trained-what-it-claims check, the change
against outcome metrics (drift, the style split), and the paragraph that answers the study's
question for this comparison, every number in it read from the records.

:func:`change_points` pairs any train records with their eval records, one point per run: the hook
for ``sdtune tune``, whose trials (one technique at several learning rates) go into the same scatter
(:func:`sdtune.report.change_plots.change_scatter`) as the techniques of a comparison.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from sdtune.records import EvalRecord, TrainRecord, trained_check
from sdtune.report.summary import BASE, Row

# outcome metrics the change is set against, in order of preference: drift (peft's image-gen
# benchmark), CLIP preservation, the demo's held-out accuracy, and the share of images in the full style
OUTCOMES = ("drift", "preservation", "judge_heldout_accuracy", "judge_full_style")
STYLE_SPLITS = ("judge_style_split", "style_split")


@dataclass
class ChangePoint:
    """One run: its label, its technique kind (the colour), its anatomy's total, its learning rate and
    the final model's outcome metrics (``metrics``: name → value)."""

    label: str
    kind: str
    total: dict[str, Any]
    learning_rate: float | None
    metrics: dict[str, float] = field(default_factory=dict)


def _final_evals(record: TrainRecord, evals: list[EvalRecord]) -> list[EvalRecord]:
    done = (record.steps or {}).get("done")
    return [
        e for e in evals
        if e.label == record.technique.get("name") and e.train_seed == record.seeds.get("train")
        and (e.step is None or done is None or e.step >= done)
    ]


def change_points(train: list[TrainRecord], evals: list[EvalRecord]) -> list[ChangePoint]:
    """One point per finished train record with an anatomy, with its final model's numeric metrics."""
    points = []
    for record in train:
        if record.status != "finished" or not record.anatomy:
            continue
        metrics = {
            name: entry["value"] for e in _final_evals(record, evals) for name, entry in e.metrics.items()
            if isinstance(entry.get("value"), (int, float))
        }
        points.append(ChangePoint(
            label=record.technique["name"], kind=record.technique["kind"], total=record.anatomy["total"],
            learning_rate=(record.train or {}).get("learning_rate"), metrics=metrics,
        ))
    return points


def outcome_metrics(points: list[ChangePoint], limit: int = 2) -> list[str]:
    """The outcome metrics measured for every point (:data:`OUTCOMES` order), at most ``limit``."""
    measured = [name for name in OUTCOMES if points and all(name in p.metrics for p in points)]
    return measured[:limit]


def anatomies(row: Row) -> list[dict[str, Any]]:
    return [record.anatomy for record in row.train if record.status == "finished" and record.anatomy]


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def technique_summary(row: Row) -> dict[str, Any] | None:
    """A row's anatomy, averaged over its training seeds: totals, per block, per kind."""
    found = anatomies(row)
    if not found:
        return None

    def averaged(groups: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [k for k, v in groups[0].items() if isinstance(v, (int, float))]
        return {key: _mean([g.get(key) for g in groups]) for key in keys}

    blocks = list(dict.fromkeys(name for a in found for name in a["blocks"]))
    kinds = list(dict.fromkeys(name for a in found for name in a["kinds"]))
    return {
        "label": row.label, "kind": row.kind, "seeds": len(found), "method": found[0]["method"],
        "total": averaged([a["total"] for a in found]),
        "blocks": {b: averaged([a["blocks"][b] for a in found if b in a["blocks"]]) for b in blocks},
        "kinds": {k: averaged([a["kinds"][k] for a in found if k in a["kinds"]]) for k in kinds},
        "time_s": _mean([a["time_s"] for a in found]),
        "rank_exact": all(layer["rank_exact"] for a in found for layer in a["layers"]),
    }


def summaries(rows: list[Row]) -> list[dict[str, Any]]:
    return [s for row in rows if row.label != BASE and (s := technique_summary(row))]


def check_status(row: Row) -> str:
    """"passed", "FAILED (items)", or "—" (not checked) over the row's runs."""
    checks = [c for record in row.train if (c := trained_check(record)) is not None]
    if not checks:
        return "—"
    failed = [c for c in checks if not c.passed]
    if not failed:
        return "passed"
    return "FAILED (" + ", ".join(sorted({f["item"] for c in failed for f in c.failures})) + ")"


def check_failures(rows: list[Row]) -> list[list[str]]:
    """[technique, item, where, detail] of every failed claim."""
    return [
        [row.label, f["item"], f["where"], f["detail"]]
        for row in rows for record in row.train if (c := trained_check(record)) and not c.passed for f in c.failures
    ]


def largest(groups: dict[str, dict[str, Any]], count: int = 2) -> list[tuple[str, float]]:
    """The groups holding most of the change: (name, share of Σ‖ΔW‖²), largest first."""
    ranked = sorted(((name, g.get("share") or 0.0) for name, g in groups.items()), key=lambda item: -item[1])
    return [(name, share) for name, share in ranked[:count] if share > 0]


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (None: fewer than 3 points, or no variation in one of them)."""
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    value = float(spearmanr(xs, ys).statistic)
    return None if math.isnan(value) else value
