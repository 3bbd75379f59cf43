"""The paragraph under "What each technique changed": the study's open question (full fine-tuning and
LoRA drew different styles from the same data and settings; "other reasons remain to be explored")
answered for this comparison — where each technique's change lives, how many dimensions it uses,
which one introduces new directions, and how that lines up with the style split and drift.

Every number is read from the records (:mod:`sdtune.report.changes`); every comparison word ("more",
"rises") is chosen by comparing those numbers. Nothing here is a claim written by hand.
"""

from __future__ import annotations

from typing import Any

from sdtune.report.changes import (
    STYLE_SPLITS,
    ChangePoint,
    largest,
    outcome_metrics,
    spearman,
    summaries,
)
from sdtune.report.summary import Row, metric_summary, share_summary


def _pct(value: float | None) -> str:
    """A share or a relative change as a percentage, to two significant figures (whole above 10 %)."""
    if value is None:
        return "—"
    percent = 100 * value
    return f"{percent:.0f} %" if abs(percent) >= 10 else f"{percent:.2g} %"


def _name(summary: dict[str, Any]) -> str:
    """The technique as the study names it, with its name in the experiment when that differs."""
    kind = {"full": "full fine-tuning", "lora": "LoRA"}.get(summary["kind"], summary["kind"])
    return kind if summary["label"] in (summary["kind"], kind) else f"{kind} ({summary['label']})"


def _pair(found: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], str] | None:
    """Full fine-tuning and LoRA, else the techniques that changed the weights most and least."""
    full = next((s for s in found if s["kind"] == "full"), None)
    lora = next((s for s in found if s["kind"] == "lora"), None)
    if full and lora:
        return full, lora, "the study's pair"
    if len(found) < 2:
        return None
    ranked = sorted(found, key=lambda s: -(s["total"].get("relative") or 0.0))
    return ranked[0], ranked[-1], "no full fine-tuning and LoRA pair here: the techniques that changed the weights most and least"


def _where(summary: dict[str, Any]) -> str:
    blocks = ", ".join(f"{name} {_pct(share)}" for name, share in largest(summary["blocks"]))
    kinds = ", ".join(f"{name} {_pct(share)}" for name, share in largest(summary["kinds"]))
    total = summary["total"]
    return (
        f"{_name(summary)} changed {total['changed_layers']:.0f} weight matrices, by {_pct(total['relative'])} of the "
        f"weights' norm in all; most of its change (share of Σ‖ΔW‖²) lies in {blocks}, and by kind in {kinds}"
    )


def _dimensions(a: dict[str, Any], b: dict[str, Any]) -> str:
    def one(s: dict[str, Any]) -> str:
        bound = "" if s["rank_exact"] else f" or more: its spectra are the top {s['method'].get('spectrum_top')} values"
        return (f"{s['total']['effective_rank_median']:.1f} for {_name(s)} (numerical rank up to "
                f"{s['total']['numerical_rank_max']:.0f}{bound})")

    ea, eb = a["total"]["effective_rank_median"], b["total"]["effective_rank_median"]
    wider, narrower = (a, b) if ea >= eb else (b, a)
    ratio = max(ea, eb) / min(ea, eb) if min(ea, eb) > 0 else None
    spread = f"{_name(wider)} spreads its change over {ratio:.1f}× as many dimensions as {_name(narrower)}" if ratio else ""
    return f"The median effective rank of a changed matrix's ΔW is {one(a)} and {one(b)}" + (f": {spread}" if spread else "")


def _intruders(a: dict[str, Any], b: dict[str, Any]) -> str:
    k, epsilon = a["method"]["intruders"]["k"], a["method"]["intruders"]["epsilon"]

    def one(s: dict[str, Any]) -> str:
        t = s["total"]
        return f"{t['intruders']:.0f} in {t['layers_with_intruders']:.0f} of {t['changed_layers']:.0f} matrices for {_name(s)}"

    ia, ib = a["total"]["intruders"], b["total"]["intruders"]
    if ia == ib == 0:
        verdict = "neither introduces new directions"
    elif ia == ib:
        verdict = "both introduce as many new directions"
    else:
        verdict = f"{_name(a if ia > ib else b)} introduces more new directions"
    return (f"Intruder dimensions (of the top {k} singular vectors of a tuned matrix, those with |cos| < {epsilon} to "
            f"every singular vector of the base matrix) number {one(a)} and {one(b)}: {verdict}")


def _outcomes(rows: list[Row], a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    by_label = {row.label: row for row in rows}
    sentences = []
    split = next((m for m in STYLE_SPLITS if share_summary(by_label[a["label"]], m)), None)
    if split:
        def shares(s: dict[str, Any]) -> str:
            found = share_summary(by_label[s["label"]], split) or {}
            return f"{_name(s)} " + ", ".join(f"{label} {_pct(value)}" for label, value in found.items())

        sentences.append(f"The style split ({split}, share of images per class): {shares(a)}; {shares(b)}")
    for metric, words, shown in (("drift", "drift (lower: closer to the base model)", lambda v: f"{v:.3g}"),
                                 ("judge_heldout_accuracy", "held-out prompt accuracy (what survives of the base model)", _pct),
                                 ("judge_full_style", "share of images in the full style", _pct)):
        va, vb = (metric_summary(by_label[s["label"]], metric) for s in (a, b))
        if va and vb and "value" in va and "value" in vb:
            sentences.append(f"The {words}, {metric}: {_name(a)} {shown(va['value'])}, {_name(b)} {shown(vb['value'])}")
        elif metric == "drift":
            sentences.append("Drift was not measured in this comparison (its eval records hold no drift metric)")
    return sentences


def _trend(metric: str, x_name: str, rho: float | None) -> str:
    if rho is None:
        return f"{metric} cannot be ranked against {x_name} (no variation across the runs)"
    direction = "rises" if rho > 0 else "falls" if rho < 0 else "does not move"
    return f"{metric} {direction} with {x_name} (Spearman ρ = {rho:+.2f})"


def _across(points: list[ChangePoint]) -> list[str]:
    sentences = []
    for metric in outcome_metrics(points):
        ys = [p.metrics[metric] for p in points]
        parts = [
            _trend(metric, x_name, spearman([p.total.get(key) or 0.0 for p in points], ys))
            for x_name, key in (("the relative ΔW", "relative"), ("the intruder dimensions", "intruders"))
        ]
        sentences.append(f"Across the {len(points)} runs, " + "; ".join(parts))
    if sentences:
        sentences.append(f"With {len(points)} runs this describes this comparison; it tests nothing")
    return sentences


def answer(rows: list[Row], points: list[ChangePoint]) -> str:
    """The paragraph (see the module docstring); empty when no run has an anatomy."""
    found = summaries(rows)
    pair = _pair(found)
    if pair is None:
        sentences = [_where(s) for s in found]
    else:
        a, b, why = pair
        sentences = [f"Compared here: {_name(a)} and {_name(b)} ({why})", _where(a), _where(b), _dimensions(a, b),
                     _intruders(a, b), *_outcomes(rows, a, b), *_across(points)]
    return " ".join(f"{sentence[0].upper()}{sentence[1:]}." for sentence in sentences)
