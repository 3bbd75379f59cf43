"""One unit of work of ``sdtune tune``: train one run (a trial or a final run) into its folder, in a
fresh process, and, when the selection measure is a quality metric, measure it on the validation split.

A :class:`Job` is plain data (the experiment as a mapping), so the same :func:`run_job` runs in this
process's thread pool (``--engine local``) or in a Ray worker on any machine (``--engine ray``):
both train the same run with the same seeds and thread count, and write the same records.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune import records
from sdtune.comparison import compare, train_or_reuse
from sdtune.config import VALIDATION_LOSS
from sdtune.data.heldout import validation_images
from sdtune.evaluation import Encoders, Evaluation, Target, evaluate_model, reference_images
from sdtune.experiment import EvaluationPlan, Experiment, experiment_from_dict
from sdtune.util.distributed import process_state

THREADS_VARIABLE = "OMP_NUM_THREADS"  # torch's intra-op threads: results depend on them in the last bits


@dataclass(frozen=True)
class Job:
    """Train ``technique`` of ``experiment`` into ``out/<technique>``; its record also goes to
    ``root/records/train-<technique>-seed<seed>.json`` (``root`` is a comparison folder)."""

    label: str  # "lora/lr-1e-04" (a trial) or "tuned/lora/seed-0" (a final run)
    experiment: dict[str, Any]  # Experiment.to_dict() of what to train
    technique: str
    out: str
    root: str
    seed: int
    threads: int  # the training process's OMP_NUM_THREADS: the same on every engine
    select_by: str = VALIDATION_LOSS  # a quality metric: measured on the validation split after training
    stop_after: int | None = None  # stop (checkpointed) after this step: a rung of asha

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.technique

    @property
    def record_path(self) -> Path:
        return Path(self.root) / "records" / f"train-{self.technique}-seed{self.seed}.json"


def threads_per_run(cpus: int, max_concurrent: int) -> int:
    """Each training process's thread count: ``OMP_NUM_THREADS`` when set here, else the CPUs shared
    among the runs at a time (more threads than cores make every run crawl)."""
    given = os.environ.get(THREADS_VARIABLE, "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, cpus // max_concurrent)


def run_job(job: Job, progress: bool = False, environment: dict[str, str] | None = None) -> dict[str, Any]:
    """Train the job's run (reused when finished, resumed when interrupted) and return its record;
    with a quality ``select_by``, also write its eval record on the validation split. ``environment``
    adds variables to the training process's (the local engine's GPU for it)."""
    experiment = experiment_from_dict(job.experiment)
    record = train_or_reuse(
        experiment, job.technique, Path(job.out), Path(job.root), job.seed, progress, stop_after=job.stop_after,
        environment={THREADS_VARIABLE: str(job.threads), **(environment or {})},
    )
    if job.select_by != VALIDATION_LOSS and record["status"] == "finished":
        evaluate_on_validation(experiment, job, record, progress)
    return record


def validation_record_path(job: Job) -> Path:
    return Path(job.root) / "records" / f"eval-{job.technique}-seed{job.seed}.json"


def evaluate_on_validation(experiment: Experiment, job: Job, record: dict[str, Any], progress: bool) -> None:
    """The selection metric of a finished trial, measured on the validation split only: one image per
    validation caption (seed 0), compared with the validation images — never the evaluation prompts."""
    if validation_record_path(job).exists():
        return
    settings = experiment.evaluation
    held_out = validation_images(experiment.data, experiment.validation, settings.max_reference_images)
    captions = tuple(item.caption for item in held_out)
    on_validation = dataclasses.replace(
        experiment.with_evaluation(metrics=[job.select_by]),
        plan=EvaluationPlan(prompts=captions, in_domain=(True,) * len(captions), seeds=(0,)),
    )
    evaluation = Evaluation(
        experiment=on_validation, root=Path(job.root), references=reference_images(on_validation),
        encoders=Encoders(on_validation), progress=progress,
    )
    evaluate_model(evaluation, Target(job.technique, record, job.seed, record["steps"]["done"]), process_state())


def read_validation_score(job: Job) -> float | None:
    """The selection metric a trial's eval record holds (None when it was not measured or skipped)."""
    path = validation_record_path(job)
    if not path.exists():
        return None
    entry = records.read_record_file(path).metrics.get(job.select_by) or {}
    value = entry.get("value")
    return float(value) if isinstance(value, (int, float)) else None


def evaluate_arm(experiment: dict[str, Any], root: str, seeds: list[int], progress: bool = False) -> str:
    """Evaluate one arm of final runs (already trained) as a comparison: the base model and every run
    at the evaluation prompts × seeds, its records and its own report; returns the report's path."""
    report = compare(experiment_from_dict(experiment), root, seeds=seeds, progress=progress, evaluate_only=True)
    return str(report)
