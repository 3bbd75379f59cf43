"""The demo's exact metrics: the judge reads colour, shape and style off every generated image.

The demo registers them itself when this module is imported (the demo's experiment file lists it in
``evaluation.metric_plugins``), as not-default metrics: they run only where an experiment names them
(``evaluation.metrics``), since they are meaningful only for the demo's world. The judge needs no
model: it is pure image analysis.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdtune.demo import world
from sdtune.demo.judge import STYLE_CLASSES, judge_many, subject_shape
from sdtune.metrics.maths import bootstrap_ci
from sdtune.metrics.registry import MetricContext, register_metric

PLUGIN = __name__  # what an experiment lists in evaluation.metric_plugins to get these metrics


def prompt_targets(prompt: str) -> tuple[str | None, str | None]:
    """The colour and shape a demo prompt asks for (None where it names none)."""
    words = prompt.lower().split()
    colour = next((w for w in words if w in world.COLOURS), None)
    shape = next((w for w in words if w in world.SHAPES), None)
    return colour, shape


def _judged(ctx: MetricContext) -> list[Any]:
    return ctx.cached("demo.judgements", lambda: judge_many(ctx.images))  # once for all judge metrics


def _correct(ctx: MetricContext) -> tuple[np.ndarray, np.ndarray]:
    judgements = _judged(ctx)
    targets = [prompt_targets(p) for p in ctx.prompts]
    colour = np.array([j.colour == c for j, (c, _) in zip(judgements, targets)], dtype=float)
    shape = np.array([j.shape == s for j, (_, s) in zip(judgements, targets)], dtype=float)
    return colour, shape


def _share(values: np.ndarray, rows: np.ndarray, seed: int) -> dict[str, Any]:
    if not len(rows):
        return {"value": None}
    mean, low, high = bootstrap_ci(values[rows], seed=seed)
    return {"value": mean, "ci_low": low, "ci_high": high, "n": len(rows)}


@register_metric("judge_prompt_accuracy", direction="higher", default=False)
def prompt_accuracy(ctx: MetricContext) -> dict[str, Any]:
    """Share of images whose colour and shape are the ones the prompt asks for (all prompts)."""
    colour, shape = _correct(ctx)
    both = colour * shape
    result = _share(both, np.arange(len(both)), ctx.seed)
    result["colour"] = float(colour.mean())
    result["shape"] = float(shape.mean())
    return result


@register_metric("judge_heldout_accuracy", direction="higher", default=False)
def heldout_accuracy(ctx: MetricContext) -> dict[str, Any]:
    """Prompt accuracy on held-out combinations (never in the fine-tuning set): preservation."""
    colour, shape = _correct(ctx)
    return _share(colour * shape, ctx.indices(in_domain=False), ctx.seed)


@register_metric("judge_style_split", direction="none", default=False)
def style_split(ctx: MetricContext) -> dict[str, Any]:
    """Share of images in each style class (base look / partial style / full style): the study's table."""
    styles = [j.style for j in _judged(ctx)]
    shares = {name: styles.count(name) / len(styles) for name in STYLE_CLASSES}
    return {"value": shares}


@register_metric("judge_full_style", direction="none", default=False)
def full_style(ctx: MetricContext) -> dict[str, Any]:
    """Share of images drawn in the full fine-tuning style (how strongly the style took/leaked)."""
    full = np.array([j.style == "full" for j in _judged(ctx)], dtype=float)
    return _share(full, np.arange(len(full)), ctx.seed)


# The subject round (``sdtune demo --subject``): its in-domain prompts name the new object, its
# out-of-domain prompts the base world's shapes.


@register_metric("judge_subject_drawn", direction="higher", default=False)
def subject_drawn(ctx: MetricContext) -> dict[str, Any]:
    """Share of the subject prompts' images that draw the new object (a plus, judged exactly)."""
    rows = ctx.indices(in_domain=True)
    judgements = _judged(ctx)
    drawn = np.array([subject_shape(j) == world.SUBJECT_SHAPES[0] for j in judgements], dtype=float)
    result = _share(drawn, rows, ctx.seed)
    if len(rows):
        result["colour"] = float(np.mean([judgements[i].colour == world.SUBJECT_COLOUR for i in rows]))
    return result


@register_metric("judge_others_kept", direction="higher", default=False)
def others_kept(ctx: MetricContext) -> dict[str, Any]:
    """Share of the other prompts' images that still draw the asked colour and shape (the new object
    counts as a shape: a circle drawn as a plus is wrong); ``shape``: the share with the asked shape
    whatever its colour; ``as_subject``: the share drawn as the new object."""
    rows = ctx.indices(in_domain=False)
    judgements = _judged(ctx)
    targets = [prompt_targets(p) for p in ctx.prompts]
    kept = np.array(
        [j.colour == c and subject_shape(j) == s for j, (c, s) in zip(judgements, targets)], dtype=float
    )
    result = _share(kept, rows, ctx.seed)
    if len(rows):
        result["shape"] = float(np.mean([subject_shape(judgements[i]) == targets[i][1] for i in rows]))
        result["as_subject"] = float(np.mean([subject_shape(judgements[i]) == world.SUBJECT_SHAPES[0] for i in rows]))
    return result


SUBJECT_METRICS = ["judge_subject_drawn", "judge_others_kept"]
JUDGE_METRICS = ["judge_prompt_accuracy", "judge_heldout_accuracy", "judge_full_style", "judge_style_split"]
