"""The training loop's mutable state, one typed object saved in every checkpoint.

Everything else a resumed run needs is either in the checkpoint's tensors (trained weights, optimizer,
schedule, EMA) or a pure function of the experiment (data order, noise): see :mod:`sdtune.training`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrainState:
    """Step, losses and evaluations so far; ``state_dict`` is what the checkpoint's JSON holds."""

    step: int = 0  # optimizer steps done
    loss_history: list[dict[str, float]] = field(default_factory=list)  # {step, loss, lr} of every step
    train_time_s: float = 0.0  # device-synchronised loop time of every session of the run
    resumed_from: list[str] = field(default_factory=list)  # checkpoints this run was resumed from, in order
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what shapes the run (training.fingerprint), flat
    changed_on_resume: list[dict[str, Any]] = field(default_factory=list)  # {step, key, before, after} accepted
    evaluation: list[dict[str, Any]] = field(default_factory=list)  # validation loss and images per evaluated step
    # the trained-what-it-claims check's evidence (sdtune.training.trained_check): the start's digests,
    # the gradient flags set so far, the steps they were watched, failures found at a resume
    trained_evidence: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore from a checkpoint (keys an older checkpoint lacks keep their defaults)."""
        known = {f.name for f in fields(self)}
        for key, value in saved.items():
            if key in known:
                setattr(self, key, copy.deepcopy(value))

    def record_evaluation(self, entry: dict[str, Any]) -> None:
        """Add a step's evaluation, replacing one of the same step (from before a resume)."""
        self.evaluation = [*(e for e in self.evaluation if e["step"] != entry["step"]), entry]
