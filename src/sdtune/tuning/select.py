"""Selection: each trial's score on the validation split, and each technique's chosen learning rate.

Pure functions of the trials' records. The score is the validation loss at the trial's last step
(fixed noise and timesteps: :mod:`sdtune.training.evaluator`) or the selection metric measured on
the validation split; the best finished trial wins (ties: the lower rate). A choice at the lowest or
highest rate of the range is flagged: the best rate may lie outside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sdtune.config import VALIDATION_LOSS


def validation_curve(record: dict[str, Any]) -> list[dict[str, float]]:
    """The validation loss at every evaluated step of a run: ``[{step, validation_loss}]``."""
    return [
        {"step": entry["step"], "validation_loss": entry["validation_loss"]}
        for entry in record.get("evaluation") or []
        if entry.get("validation_loss") is not None
    ]


def loss_at(record: dict[str, Any], step: int) -> float | None:
    return next((point["validation_loss"] for point in validation_curve(record) if point["step"] == step), None)


def trial_entry(
    record: dict[str, Any] | None, learning_rate: float, select_by: str, metric_score: float | None, root: Path,
    record_path: Path, steps: int,
) -> dict[str, Any]:
    """A trial as the selection record lists it: rate, status, score, steps done, its validation-loss
    curve, wall time and where its record is (relative to the output folder ``root``)."""
    if record is None:
        return {"learning_rate": learning_rate, "status": "pending", "score": None, "steps": 0}
    done = (record.get("steps") or {}).get("done") or 0
    status = record["status"]
    if status == "finished":
        score = loss_at(record, done) if select_by == VALIDATION_LOSS else metric_score
    else:
        score = None
    timing = record.get("timing") or {}
    return {
        "learning_rate": learning_rate,
        "status": status,
        "score": score if score is None or math.isfinite(score) else None,
        "steps": done,
        "complete": status == "finished" and done == steps,
        "curve": validation_curve(record),
        "wall_time_s": timing.get("job_wall_time_s"),
        "error": record.get("error"),
        "record": str(record_path.relative_to(root)) if record_path.is_relative_to(root) else str(record_path),
    }


def choose(entries: list[dict[str, Any]], direction: str) -> dict[str, Any]:
    """The chosen rate among the complete trials: the best score (``direction``: lower or higher is
    better; ties: the lower rate), and whether it sits at the edge of the range (``low``/``high``)."""
    rates = sorted(entry["learning_rate"] for entry in entries)
    scored = [e for e in sorted(entries, key=lambda e: e["learning_rate"]) if e.get("complete") and e["score"] is not None]
    if not scored:
        return {"chosen_learning_rate": None, "score": None, "at_edge": None}
    sign = 1 if direction == "lower" else -1
    best = min(scored, key=lambda entry: sign * entry["score"])
    at_edge = "low" if best["learning_rate"] == rates[0] else "high" if best["learning_rate"] == rates[-1] else None
    return {"chosen_learning_rate": best["learning_rate"], "score": best["score"], "at_edge": at_edge}


def technique_summary(
    entries: list[dict[str, Any]], direction: str, shared_learning_rate: float, trial_steps: list[int] | None = None
) -> dict[str, Any]:
    """One technique's line of the selection record: its trials, the choice, and the tuning cost
    (optimizer steps trained over all its trials — asha's, the steps it ran — and their wall time)."""
    first_curve = next((e["curve"] for e in entries if e.get("curve")), [])
    start = next((point["validation_loss"] for point in first_curve if point["step"] == 0), None)
    steps = trial_steps if trial_steps is not None else [e.get("steps") or 0 for e in entries]
    return {
        "trials": entries,
        **choose(entries, direction),
        "shared_learning_rate": shared_learning_rate,
        "start_validation_loss": start,  # the base model's (step 0): every trial starts there
        "trial_steps": int(sum(steps)),
        "trial_wall_time_s": float(sum(e.get("wall_time_s") or 0.0 for e in entries)),
    }
