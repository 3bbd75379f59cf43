"""The held-out validation split (``data.validation``): which rows are never trained on.

A leaf module (pure: no I/O, no dataset code), so the data loader and the evaluation both read the
same split. ``data.validation`` is one of:

- a fraction, ``0.1``, or ``{fraction: 0.1, seed: 0}``: that share of the rows (at least one),
  drawn with the seed, is held out of training;
- a separate source, ``"path/or/hub-id"`` or ``{source: …, split: validation, max_samples: …}``:
  training uses every row of ``data.source``, validation the rows of that source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdtune.config.schema import ConfigError

KEYS = ("fraction", "seed", "source", "split", "max_samples")


@dataclass(frozen=True)
class ValidationSplit:
    """``data.validation``, parsed: a held-out ``fraction`` (with its ``seed``) or a ``source``."""

    fraction: float | None = None
    seed: int = 0
    source: str | None = None
    split: str = "train"
    max_samples: int | None = None


def parse_validation(raw: float | str | dict[str, Any] | None) -> ValidationSplit | None:
    """``data.validation`` as a :class:`ValidationSplit` (None: no validation split); a bad value is a
    :class:`ConfigError` naming it and what is allowed."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        _bad(raw)
    if isinstance(raw, (int, float)):
        raw = {"fraction": raw}
    elif isinstance(raw, str):
        raw = {"source": raw}
    if not isinstance(raw, dict):
        _bad(raw)
    unknown = [key for key in raw if key not in KEYS]
    if unknown:
        raise ConfigError(f"data.validation.{unknown[0]}: unknown key; allowed keys: {', '.join(KEYS)}")
    split = ValidationSplit(**raw)
    if (split.fraction is None) == (split.source is None):
        raise ConfigError("data.validation: give a fraction (e.g. 0.1) or a source (a second dataset), not both")
    if split.fraction is not None and not (isinstance(split.fraction, (int, float)) and 0 < split.fraction < 1):
        raise ConfigError(f"data.validation.fraction: {split.fraction!r} is not allowed; expected a share in (0, 1), e.g. 0.1")
    if not isinstance(split.seed, int) or isinstance(split.seed, bool):
        raise ConfigError(f"data.validation.seed: {split.seed!r} is not allowed; expected a whole number")
    if split.max_samples is not None and (not isinstance(split.max_samples, int) or split.max_samples <= 0):
        raise ConfigError(f"data.validation.max_samples: {split.max_samples!r} is not allowed; expected a positive whole number")
    return split


def check_validation(raw: Any) -> None:
    """Validate ``data.validation`` at load (the parsed split is rebuilt where it is used)."""
    parse_validation(raw)


def resolve_validation_source(raw: Any, resolve: Any) -> Any:
    """``data.validation`` with its source passed through ``resolve`` (relative paths in an
    experiment file are relative to the file); other forms are returned as they are."""
    if isinstance(raw, str):
        return resolve(raw)
    if isinstance(raw, dict) and isinstance(raw.get("source"), str):
        return {**raw, "source": resolve(raw["source"])}
    return raw


def held_out_rows(split: ValidationSplit | None, num_rows: int) -> list[int]:
    """The rows of ``data.source`` held out for validation, sorted (none for a separate source).

    A fraction holds out ``ceil(fraction · rows)`` rows (at least one, never all), drawn from the
    seed's permutation of the rows, so the split does not depend on the training seed."""
    if split is None or split.fraction is None:
        return []
    if num_rows < 2:
        raise ConfigError(f"data.validation: {num_rows} row(s) cannot be split; add images or use a separate source")
    count = min(max(1, math.ceil(split.fraction * num_rows)), num_rows - 1)
    order = np.random.default_rng(split.seed).permutation(num_rows)
    return sorted(int(row) for row in order[:count])


def _bad(raw: Any) -> None:
    raise ConfigError(
        f"data.validation: {raw!r} is not allowed; expected a fraction such as 0.1, {{fraction: 0.1, seed: 0}}, "
        "or a separate source {source: PATH, split: validation}"
    )
