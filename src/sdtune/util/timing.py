"""Wall-clock timing that means what it says on an asynchronous device.

CUDA (and MPS) kernels run after the Python call that queued them returns, so a clock read right
after a step measures how fast Python queued the work, not how long the device took. Every reading
here is taken after :func:`synchronize`; the training loop synchronises only at its sync points
(logging, checkpoints, the end), and the time between two sync points is attributed to the steps
between them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sdtune.util.device import synchronize


@dataclass
class StepClock:
    """Training-loop time between device-synchronised readings, minus excluded work (checkpoints),
    and the per-interval step times from which the steady-state rate is taken."""

    device: torch.device
    total_s: float = 0.0  # loop time over all steps, exclusions removed
    excluded_s: float = 0.0
    excluded_by: dict[str, float] = field(default_factory=dict)  # excluded_s by kind of work
    syncs: int = 0
    intervals: list[tuple[int, float]] = field(default_factory=list)  # (steps, seconds) between sync points
    _last: float = 0.0
    _steps_since: int = 0
    _encoded_seen_s: float = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._last = time.perf_counter()

    def step_done(self) -> None:
        self._steps_since += 1

    def sync_point(self, encoded_s: float | None = None) -> None:
        """Synchronise, and attribute the time since the last sync point to the steps in between, less
        the work in that interval that is not a training step (first-use encodes: ``encoded_s`` is
        their running total, of which the part not yet subtracted is taken out)."""
        synchronize(self.device)
        now = time.perf_counter()
        elapsed = now - self._last
        minus_s = 0.0 if encoded_s is None else encoded_s - self._encoded_seen_s
        if encoded_s is not None:
            self._encoded_seen_s = encoded_s
        self.total_s += elapsed
        self.syncs += 1
        if self._steps_since:
            self.intervals.append((self._steps_since, max(elapsed - minus_s, 0.0)))
        self._last, self._steps_since = now, 0

    @contextlib.contextmanager
    def excluded(self, kind: str = "checkpoint") -> Iterator[None]:
        """Work inside is not training time (checkpoint writes, evaluation while training):
        synchronise before and after; its time is added to ``excluded_s`` and ``excluded_by[kind]``.
        Right after a sync point (the loop's checkpoints and evaluations come after one) no step is
        pending: the device is synchronised, but that is no new sync point (``syncs`` counts those)."""
        if self._steps_since:
            self.sync_point()
        else:
            synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self._last = time.perf_counter()
            self.excluded_s += self._last - started
            self.excluded_by[kind] = self.excluded_by.get(kind, 0.0) + self._last - started

    def steady_s_per_step(self) -> float | None:
        """Seconds per step once warmed up: the intervals after the first one (which holds start-up
        work such as allocator growth and kernel selection), each less its first-use encodes."""
        later = self.intervals[1:]
        steps = sum(n for n, _ in later)
        return sum(s for _, s in later) / steps if steps else None
