"""The ``tuning:`` section (``sdtune tune``): each technique's learning rate chosen on the validation
split with an equal budget, then final runs at the chosen and at the shared learning rate.

A leaf of the config (it imports only :mod:`sdtune.config.schema`). The checks here need only the
values; what needs the registries (the metric ``select_by`` names, its direction) is checked by
:func:`sdtune.experiment.resolve`. Learning rates are written as ``{min, max, points}`` (log-spaced,
rounded to three significant digits so that the rate a folder is named after is the rate trained)
or as a list. A technique may move its range (``techniques.NAME.tuning.learning_rate``) but not
change how many points it has: every technique gets the same number of trials of the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from sdtune.config.schema import ConfigError, check_keys, coerce, fail, positive

VALIDATION_LOSS = "validation_loss"  # the default selection measure: computed while every trial trains
RANGE_KEYS = {"min", "max", "points"}
TECHNIQUE_KEYS = {"learning_rate"}  # what a technique's own `tuning:` may set (the budget is shared)


@dataclass(frozen=True)
class TuningConfig:
    """How each technique's learning rate is tuned (``sdtune tune``)."""

    learning_rate: dict[str, Any] | list[float]  # {min, max, points} log-spaced, or a list of rates
    steps: int | None = None  # optimizer steps of every trial; None = train.max_train_steps
    select_by: str = VALIDATION_LOSS  # or a quality metric computed on the validation split (dino, clip_i, …)
    seeds: list[int] | None = None  # training seeds of the final runs; None = [train.seed]
    scheduler: Literal["grid", "asha"] = "grid"  # asha: Ray Tune's ASHAScheduler (needs --engine ray)
    reduction_factor: int = 3  # asha: a trial continues past a rung when in the best 1/η there
    grace_steps: int | None = None  # the first rung (asha) and the validation-loss interval; None = steps/η²
    rank_by: str | None = None  # what the final tables are ranked by; None = select_by
    pareto: list[str] | None = None  # [fidelity metric, drift metric] of the Pareto plot; None = the first measured

    def rates(self) -> tuple[float, ...]:
        """The shared grid of learning rates, ascending."""
        return learning_rate_grid(self.learning_rate, "tuning.learning_rate")

    def validate(self, train_max_steps: int | None, has_validation: bool) -> None:
        if not has_validation:
            raise ConfigError(
                "tuning: the learning rate is chosen on the validation split only, and data.validation is not set; "
                "add data.validation: 0.1 (a held-out share of data.source) or {source: PATH, split: validation}"
            )
        self.rates()
        positive("tuning.steps", self.steps, allow_none=True)
        if self.steps is None and train_max_steps is None:
            raise ConfigError("tuning.steps: train gives num_epochs, not max_train_steps; give tuning.steps (the steps of every trial)")
        if self.seeds is not None:
            if not self.seeds:
                fail("tuning.seeds", self.seeds, "a non-empty list of training seeds, e.g. [0, 1, 2]")
            if len(set(self.seeds)) != len(self.seeds):
                fail("tuning.seeds", self.seeds, "distinct seeds")
        if self.reduction_factor < 2:
            fail("tuning.reduction_factor", self.reduction_factor, "a whole number ≥ 2 (3 is usual)")
        positive("tuning.grace_steps", self.grace_steps, allow_none=True)
        steps = self.steps or train_max_steps
        if self.grace_steps is not None and steps is not None and self.grace_steps > steps:
            fail("tuning.grace_steps", self.grace_steps, f"at most the steps of a trial ({steps})")
        if self.scheduler == "asha" and self.select_by != VALIDATION_LOSS:
            raise ConfigError(
                f"tuning.scheduler: asha compares trials at every rung, which only the validation loss is measured at; "
                f"use select_by: validation_loss, or scheduler: grid with select_by: {self.select_by}"
            )
        if self.pareto is not None and len(self.pareto) != 2:
            fail("tuning.pareto", self.pareto, "two metric names: [fidelity metric, drift metric], e.g. [dino, drift]")

    def trial_steps(self, train_max_steps: int | None) -> int:
        """The optimizer steps of every trial."""
        steps = self.steps or train_max_steps
        assert steps is not None  # (validate() refuses a tuning section without them)
        return steps

    def grace(self, train_max_steps: int | None) -> int:
        """The first rung: asha's first comparison, and the interval of the trials' validation loss."""
        steps = self.trial_steps(train_max_steps)
        return self.grace_steps or max(1, round(steps / self.reduction_factor**2))


def learning_rate_grid(raw: Any, where: str, points: int | None = None) -> tuple[float, ...]:
    """The learning rates of ``raw`` (a list, or ``{min, max, points}`` log-spaced), ascending; a
    range without ``points`` takes ``points``. Each rate is rounded to three significant digits."""
    if isinstance(raw, list):
        rates = [coerce(value, float, f"{where}[{i}]") for i, value in enumerate(raw)]
        if len(rates) < 2:
            fail(where, raw, "at least 2 learning rates (one gives nothing to choose from)")
        if any(rate <= 0 for rate in rates):
            fail(where, raw, "positive learning rates")
        rounded = sorted(_three_digits(rate) for rate in rates)
        if len(set(rounded)) != len(rounded):
            fail(where, raw, "distinct learning rates")
        return tuple(rounded)
    if not isinstance(raw, dict):
        fail(where, raw, "{min: 1.0e-5, max: 1.0e-2, points: 5} (log-spaced) or a list such as [1.0e-4, 3.0e-4, 1.0e-3]")
    check_keys(where, raw, RANGE_KEYS)
    low, high = (coerce(raw.get(key), float, f"{where}.{key}") for key in ("min", "max"))
    count = coerce(raw["points"], int, f"{where}.points") if "points" in raw else points
    if count is None:
        raise ConfigError(f"{where}: missing key 'points' (how many log-spaced rates between min and max)")
    if low <= 0:
        fail(f"{where}.min", low, "a positive learning rate")
    if low >= high:
        raise ConfigError(f"{where}: min {low:g} ≥ max {high:g}; give min < max")
    if count < 2:
        fail(f"{where}.points", count, "2 or more (one point gives nothing to choose from)")
    ratio = (high / low) ** (1 / (count - 1))
    rates = tuple(_three_digits(low * ratio**k) for k in range(count))
    if len(set(rates)) != count:
        raise ConfigError(f"{where}: {count} points between {low:g} and {high:g} repeat at three digits; widen the range or use fewer points")
    return rates


def technique_tuning(raw: Any, name: str, shared: TuningConfig | None) -> tuple[float, ...] | None:
    """A technique's own ``tuning:`` (only its learning-rate range): its grid, with as many points as
    the shared one (None when the entry has no ``tuning:``)."""
    where = f"techniques.{name}.tuning"
    if raw is None:
        return None
    if shared is None:
        raise ConfigError(f"{where}: the experiment has no tuning: section; add one (sdtune tune), or remove this key")
    if not isinstance(raw, dict):
        fail(where, raw, "a mapping such as {learning_rate: {min: 1.0e-6, max: 1.0e-4}}")
    for key in raw:
        if key not in TECHNIQUE_KEYS:
            raise ConfigError(
                f"{where}.{key}: a technique may only move its learning-rate range; the budget (steps, seeds, "
                f"scheduler, select_by) is the same for every technique: set tuning.{key}"
            )
    if "learning_rate" not in raw:
        raise ConfigError(f"{where}: missing key 'learning_rate' (the technique's own range)")
    count = len(shared.rates())
    rates = learning_rate_grid(raw["learning_rate"], f"{where}.learning_rate", count)
    if len(rates) != count:
        raise ConfigError(
            f"{where}.learning_rate: {len(rates)} rates, but tuning.learning_rate has {count}; every technique "
            "gets the same number of trials (an equal budget): move the range, keep the count"
        )
    return rates


def _three_digits(value: float) -> float:
    """``value`` rounded to three significant digits (5.62e-05, not 5.623413251903491e-05)."""
    digits = 2 - math.floor(math.log10(abs(value)))
    return float(round(value, digits))
