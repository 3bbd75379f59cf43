"""The tuning report's numbers and sentences, computed from records only: the selection record
(``tuning.json``) and each arm's comparison rows; ranks by ``tuning.rank_by``, the sentence of every
ranking change, the budget sentence and the edge-of-range notes. :mod:`sdtune.report.tuning` lays
them out and :mod:`sdtune.report.tuning_plots` draws them; both import this module, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune.records import RecordError, TuningRecord, load_records, load_tuning
from sdtune.report.format import rate
from sdtune.report.summary import BASE, Row, build_rows, final_validation_loss, metric_summary

VALIDATION_LOSS = "validation_loss"


@dataclass
class Study:
    """What the report reads: the selection record and each arm's rows (base model first)."""

    root: Path
    selection: TuningRecord
    arms: dict[str, list[Row]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.selection.techniques)

    def rate(self, arm: str, name: str) -> float | None:
        entry = self.selection.techniques.get(name) or {}
        return entry.get("shared_learning_rate") if arm == "shared" else entry.get("chosen_learning_rate")


def load_study(root: str | Path) -> Study:
    """The selection record of ``root`` and the rows of each arm evaluated so far."""
    root = Path(root)
    selection = load_tuning(root)
    if selection is None:
        raise RecordError(f"{root} has no tuning.json; give the output folder of an `sdtune tune` run")
    study = Study(root, selection)
    order = [BASE, *selection.techniques]
    for arm, entry in selection.finals.items():
        arm_root = root / entry["root"]
        if (arm_root / "records").is_dir():
            rows = build_rows(*load_records(arm_root))
            study.arms[arm] = sorted(rows, key=lambda row: order.index(row.label) if row.label in order else len(order))
    return study


# ------------------------------------------------------------------------------------------------
# Numbers


def measure(row: Row, name: str) -> dict[str, Any] | None:
    """A row's mean and CI of a measure: the validation loss at the last step, or a metric."""
    return final_validation_loss(row) if name == VALIDATION_LOSS else metric_summary(row, name)


def ranks(values: dict[str, float], direction: str) -> dict[str, int]:
    """1 = best; equal values share a rank (1, 2, 2, 4)."""
    sign = 1 if direction == "lower" else -1
    ordered = sorted(values, key=lambda name: sign * values[name])
    return {name: 1 + sum(sign * values[other] < sign * values[name] for other in ordered) for name in ordered}


def arm_values(study: Study, arm: str) -> dict[str, float]:
    rank_by = study.selection.tuning["rank_by"]
    found = {}
    for row in study.arms.get(arm, []):
        summary = measure(row, rank_by) if row.label != BASE else None
        if summary and isinstance(summary.get("value"), (int, float)):
            found[row.label] = float(summary["value"])
    return found


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def ranking_sentences(study: Study) -> list[str]:
    """One sentence per technique whose rank differs between the shared and the tuned rates (or one
    saying the order is the same), ranked by ``tuning.rank_by``."""
    tuning = study.selection.tuning
    shared, tuned = arm_values(study, "shared"), arm_values(study, "tuned")
    common = [name for name in study.names if name in shared and name in tuned]
    if len(common) < 2:
        return []
    direction = tuning["rank_direction"]
    at_shared, at_tuned = ranks({n: shared[n] for n in common}, direction), ranks({n: tuned[n] for n in common}, direction)
    head = f"Ranked by {tuning['rank_by']} ({direction} is better)"
    shared_rate = rate(tuning["shared_learning_rate"])
    changed = sorted((n for n in common if at_shared[n] != at_tuned[n]), key=lambda n: (at_tuned[n], n))
    if not changed:
        order = ", ".join(sorted(common, key=lambda n: (at_tuned[n], n)))
        return [f"{head}, the order is the same at the shared {shared_rate} and at the tuned rates: {order}."]
    return [
        f"{head}: at the shared {shared_rate}, {name} ranks {_ordinal(at_shared[name])} of {len(common)}; "
        f"at its tuned {rate(study.rate('tuned', name))} it ranks {_ordinal(at_tuned[name])}."
        for name in changed
    ]


def budget_sentence(selection: TuningRecord) -> str:
    budget, tuning = selection.budget, selection.tuning
    split = budget.get("selection_split") or {}
    images = f"{split['validation_images']} held-out images" if split.get("validation_images") else "the held-out images"
    per_step = budget.get("samples_per_step")
    samples = f" ({per_step} samples per step, {budget.get('samples_per_trial')} per trial)" if per_step else ""
    scheduler = "every trial run to the end (grid)" if tuning["scheduler"] == "grid" else (
        f"asha stopping the worst at each rung (η = {tuning['reduction_factor']})")
    return (
        f"Budget: {budget.get('trials_per_technique')} trials per technique of {budget.get('steps_per_trial')} steps each"
        f"{samples}, {scheduler}; held equal for every technique: {', '.join(budget.get('held_equal') or [])}; "
        f"selection by {tuning['select_by']} on the validation split only ({images}), never the evaluation prompts; "
        f"final runs: {len(tuning['seeds'])} seed(s) at each technique's chosen rate and at the shared "
        f"{rate(tuning['shared_learning_rate'])}."
    )


def edge_notes(selection: TuningRecord) -> list[str]:
    notes = []
    for name, entry in selection.techniques.items():
        if entry.get("at_edge"):
            side = "lowest" if entry["at_edge"] == "low" else "highest"
            beyond = "lower" if entry["at_edge"] == "low" else "higher"
            notes.append(
                f"{name}: the chosen {rate(entry['chosen_learning_rate'])} is the {side} rate of its range; the best rate "
                f"may be {beyond}: widen tuning.learning_rate (or techniques.{name}.tuning.learning_rate) and rerun."
            )
    return notes
