"""What ``sdtune tune`` runs and where: the trials (technique × learning rate, each a run of its own
with the same data order and seeds) and the final runs (technique × seed, at the chosen and at the
shared learning rate), the experiment each one trains, and the fingerprint that keeps one output
folder to one tuning study.

Layout of the output folder::

    tuning.json                          the selection record (sdtune.records.TuningRecord)
    trials/<technique>/lr-<rate>/        one trial: <technique>/ (the run), records/, experiment.yaml
    finals/shared/, finals/tuned/        two comparisons (sdtune compare layout): seed-<s>/<technique>/, records/, images/
    report.html, report.md               both tables, the ranking changes, sensitivity, Pareto, cost
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdtune.config import VALIDATION_LOSS
from sdtune.experiment import Experiment
from sdtune.tuning.jobs import Job
from sdtune.util import atomic

TRIALS_DIR = "trials"
FINALS_DIR = "finals"
ARMS = ("shared", "tuned")  # the final runs: at train.learning_rate, and at each technique's chosen rate
EXPERIMENT_FILE = "experiment.yaml"


def rate_label(rate: float) -> str:
    """A learning rate as folders and tables name it: 1e-04, 5.62e-05."""
    mantissa, exponent = f"{rate:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


@dataclass(frozen=True)
class Trial:
    """One technique at one learning rate for ``steps`` steps: a run of its own in ``root``."""

    technique: str
    learning_rate: float
    root: Path  # OUT/trials/<technique>/lr-<rate>: a comparison folder of this one run

    @property
    def label(self) -> str:
        return f"{self.technique}/lr-{rate_label(self.learning_rate)}"


@dataclass(frozen=True)
class Final:
    """One technique at one learning rate and training seed, fully evaluated: ``root`` is its arm's
    comparison folder (``sdtune compare --seeds`` layout)."""

    arm: str  # shared | tuned
    technique: str
    learning_rate: float | None  # None: the tuned rate, not chosen yet
    seed: int
    root: Path

    @property
    def label(self) -> str:
        return f"{self.arm}/{self.technique}/seed-{self.seed}"

    @property
    def out(self) -> Path:
        return self.root / f"seed-{self.seed}"


def middle_out(items: list[Any]) -> list[Any]:
    """The middle item first, then its neighbours alternately outward (the order asha starts trials in:
    under one trial at a time the first always runs to the end, so it should be the likeliest good one)."""
    middle = (len(items) - 1) // 2
    order = [middle]
    for distance in range(1, len(items)):
        order += [i for i in (middle + distance, middle - distance) if 0 <= i < len(items)]
    return [items[i] for i in order]


def trials(experiment: Experiment, root: Path, names: list[str]) -> list[Trial]:
    """Every trial of the named techniques, technique by technique, rates ascending."""
    assert experiment.tuning is not None
    return [
        Trial(name, rate, root / TRIALS_DIR / name / f"lr-{rate_label(rate)}")
        for name in names
        for rate in experiment.tuning.learning_rates[name]
    ]


def finals(experiment: Experiment, root: Path, names: list[str], chosen: dict[str, float | None]) -> list[Final]:
    """Every final run: each arm × seed × technique (the arm's comparison order)."""
    assert experiment.tuning is not None
    rates = {"shared": dict.fromkeys(names, experiment.train.learning_rate), "tuned": chosen}
    return [
        Final(arm, name, rates[arm].get(name), seed, root / FINALS_DIR / arm)
        for arm in ARMS
        for seed in experiment.tuning.seeds
        for name in names
    ]


def trial_experiment(experiment: Experiment, trial: Trial) -> Experiment:
    """The experiment a trial trains: its technique alone, at the trial's learning rate, for the
    trials' steps, the validation loss measured every ``grace_steps`` (asha's rungs, the sensitivity
    data) and no images during training (selection reads the validation split only)."""
    tuning = experiment.tuning
    assert tuning is not None
    single = experiment.restricted_to([trial.technique]).with_technique_train(
        trial.technique, learning_rate=trial.learning_rate, max_train_steps=tuning.steps, num_epochs=None
    )
    return single.with_evaluation(every_steps=None, validation_every_steps=tuning.grace_steps)


def arm_experiment(experiment: Experiment, names: list[str], rates: dict[str, float]) -> Experiment:
    """The experiment of one arm of final runs: the named techniques, each at its rate."""
    arm = experiment.restricted_to(names)
    for name in names:
        arm = arm.with_technique_train(name, learning_rate=rates[name])
    return arm


def trial_job(experiment: Experiment, trial: Trial, threads: int, stop_after: int | None = None) -> Job:
    tuning = experiment.tuning
    assert tuning is not None
    return Job(
        label=trial.label, experiment=trial_experiment(experiment, trial).to_dict(), technique=trial.technique,
        out=str(trial.root), root=str(trial.root), seed=experiment.train.seed, threads=threads,
        select_by=tuning.select_by, stop_after=stop_after,
    )


def final_job(arm: Experiment, final: Final, threads: int) -> Job:
    return Job(
        label=final.label, experiment=arm.with_seed(final.seed).to_dict(), technique=final.technique,
        out=str(final.out), root=str(final.root), seed=final.seed, threads=threads,
    )


# ------------------------------------------------------------------------------------------------
# One output folder, one study


def fingerprint_parts(experiment: Experiment) -> dict[str, Any]:
    """What the trials and final runs depend on: changing any of it between two runs into one output
    folder would mix runs of different studies. (The evaluation prompts and metrics are not here: a
    change there re-evaluates the final runs.)"""
    raw = experiment.to_dict()
    evaluation = raw["evaluation"]
    measured = {key: evaluation[key] for key in ("validation_timesteps", "max_reference_images")}
    if experiment.tuning is not None and experiment.tuning.select_by != VALIDATION_LOSS:
        measured |= {key: value for key, value in evaluation.items() if key.endswith("_model") or key == "metric_plugins"}
    return {key: raw.get(key) for key in ("model", "data", "train", "techniques", "tuning")} | {"evaluation": measured}


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def first_change(before: Any, after: Any, path: str = "") -> str | None:
    """The first key path whose value differs, as ``path: before → after`` (None when equal)."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in [*before, *(k for k in after if k not in before)]:
            found = first_change(before.get(key), after.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if before == after else f"{path}: {before!r} → {after!r}"


# ------------------------------------------------------------------------------------------------
# --plan


def write_experiment(path: Path, experiment: Experiment) -> Path:
    atomic.write_text(path, yaml.safe_dump(experiment.to_dict(), sort_keys=False))
    return path


def plan_entries(
    experiment: Experiment, root: Path, names: list[str], chosen: dict[str, float | None]
) -> list[dict[str, Any]]:
    """One entry per trial and final run, with the ``sdtune train`` command that runs it elsewhere
    (the experiment files it names are written here). A tuned final whose rate is not chosen yet has
    no command: it follows from the trials' records (``sdtune tune`` again selects and trains it)."""
    entries = []
    for trial in trials(experiment, root, names):
        path = write_experiment(trial.root / EXPERIMENT_FILE, trial_experiment(experiment, trial))
        entries.append({
            "phase": "trial", "technique": trial.technique, "learning_rate": trial.learning_rate,
            "seed": experiment.train.seed, "run_dir": str(trial.root / trial.technique),
            "command": ["sdtune", "train", str(path), "--technique", trial.technique, "--output", str(trial.root), "--resume"],
        })
    planned, arm_files = finals(experiment, root, names, chosen), {}
    for arm in ARMS:
        rates = {final.technique: final.learning_rate for final in planned if final.arm == arm}
        if all(rate is not None for rate in rates.values()):
            arm_files[arm] = write_experiment(root / FINALS_DIR / arm / EXPERIMENT_FILE, arm_experiment(experiment, names, rates))
    for final in planned:
        command = None
        if final.arm in arm_files:
            command = ["sdtune", "train", str(arm_files[final.arm]), "--technique", final.technique, "--output",
                       str(final.out), "--set", f"train.seed={final.seed}", "--resume"]
        entries.append({
            "phase": "final", "arm": final.arm, "technique": final.technique, "learning_rate": final.learning_rate,
            "seed": final.seed, "run_dir": str(final.out / final.technique), "command": command,
            **({} if command else {"after": "the trials: `sdtune tune` chooses this rate, then trains it"}),
        })
    return entries
