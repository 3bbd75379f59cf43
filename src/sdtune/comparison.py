"""``sdtune compare``: train every technique, evaluate every model, write the report.

This module only orchestrates: which runs to train (or reuse, or mark failed/missing) and which
models to evaluate. :mod:`sdtune.evaluation.evaluate` turns one model into images, metrics and an eval record;
everything measured lands in ``DIR/records/*.json`` (one per training run, one per evaluated model
and evaluated step); :func:`sdtune.report.render.render_report` builds the report from those files alone.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from pathlib import Path
from typing import Any

from sdtune import records
from sdtune.errors import UserError
from sdtune.evaluation import (
    BASE_LABEL,
    RECORDS_DIR,
    Encoders,
    Evaluation,
    References,
    Target,
    evaluate_model,
    evaluate_training_steps,
    reference_images,
)
from sdtune.experiment import Experiment
from sdtune.preflight import check_comparison
from sdtune.report import render_report
from sdtune.report.live import ERROR_FILE, LiveReport, RunStatus, run_status, running_status
from sdtune.runner import TechniqueFailed, train_in_fresh_process
from sdtune.training import output_root, train_technique
from sdtune.util import atomic
from sdtune.util.distributed import launch_rank, launched_processes, process_state

log = logging.getLogger(__name__)


class ComparisonInterrupted(UserError, RuntimeError):
    """Ctrl-C during a comparison: the technique was checkpointed; rerunning resumes it."""


def compare(
    experiment: Experiment,
    output_dir: str | Path | None = None,
    seeds: list[int] | None = None,
    only: str | list[str] | None = None,
    progress: bool = True,
    clip_loader: Any = None,
    evaluate_only: bool = False,
) -> Path:
    """Train (or reuse) every technique per training seed, evaluate all models, render the report.

    ``only``: some techniques (a list, or names separated by commas). With ``evaluate_only``
    nothing trains: the finished runs found are evaluated (those trained elsewhere from
    :func:`compare_plan`'s commands), and a run not found is a 'missing' row. Everything that can be
    checked is, before anything trains (:func:`sdtune.preflight.check_comparison`)."""
    names = check_comparison(experiment, output_dir, seeds, only, evaluate_only)
    root = output_root(experiment, output_dir)
    (root / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    train_seeds = seeds or [experiment.train.seed]
    planned = [(seed, name) for seed in train_seeds for name in names]
    progress_of = _Progress(root, planned, seeds is not None)
    live = LiveReport(root, progress_of.statuses, progress_of.phase) if launch_rank() == 0 else contextlib.nullcontext()
    with live:
        runs = []
        for seed, name in planned:
            seeded = experiment.with_seed(seed)
            out = root if seeds is None else root / f"seed-{seed}"
            progress_of.started(seed, name)
            runs.append(train_or_reuse(seeded, name, out, root, seed, progress, train=not evaluate_only))
            progress_of.ended(seed, name, runs[-1])
            if runs[-1]["status"] == "interrupted":
                raise ComparisonInterrupted(
                    f"{name} was interrupted and checkpointed; run the same `sdtune compare` again to resume"
                )
        progress_of.evaluating = True
        state = _evaluate(experiment, root, runs, progress, clip_loader)
    if not state.is_main_process:
        return root / "report.html"
    return render_report(root)  # the final report replaces the live page


def _evaluate(experiment: Experiment, root: Path, runs: list[dict], progress: bool, clip_loader: Any) -> Any:
    """Every launched process generates its share of the images; the main one measures them."""
    state = process_state()
    overrides = {"clip": clip_loader} if clip_loader else None
    evaluation = Evaluation(
        experiment=experiment, root=root,
        references=reference_images(experiment) if state.is_main_process else References(),
        encoders=Encoders(experiment, overrides), progress=progress,
    )
    evaluate_model(evaluation, Target(BASE_LABEL), state)
    for run in runs:
        if run["status"] == "finished":
            seed = run["seeds"]["train"]
            evaluate_model(evaluation, Target(run["technique"]["name"], run, seed, run["steps"]["done"]), state)
            if state.is_main_process:
                evaluate_training_steps(evaluation, run)
    return state


class _Progress:
    """What the live page shows of a comparison: the runs this job trains, in order, each queued
    until its turn, then its run folder's status (:func:`run_status`) while its process trains,
    then the outcome the parent got back. Written by the main thread, read by the live report's."""

    def __init__(self, root: Path, planned: list[tuple[int, str]], seeded: bool) -> None:
        self.root, self.planned, self.seeded = root, planned, seeded
        self.current: tuple[int, str] | None = None
        self.outcomes: dict[tuple[int, str], RunStatus] = {}
        self.evaluating = False

    def label(self, seed: int, name: str) -> str:
        return f"{name}/seed-{seed}" if self.seeded else name

    def run_dir(self, seed: int, name: str) -> Path:
        return (self.root / f"seed-{seed}" if self.seeded else self.root) / name

    def started(self, seed: int, name: str) -> None:
        self.current = (seed, name)

    def ended(self, seed: int, name: str, record: dict) -> None:
        label, steps = self.label(seed, name), record.get("steps") or {}
        if record["status"] == "finished":
            self.outcomes[seed, name] = RunStatus(label, "finished", steps.get("done"), steps.get("max"))
        else:  # failed, missing (--evaluate-only), or interrupted
            self.outcomes[seed, name] = run_status(label, self.run_dir(seed, name))
            if self.outcomes[seed, name].state != "failed":
                reason = record.get("error") or f"{record['status']} at step {steps.get('done')}"
                self.outcomes[seed, name] = RunStatus(label, "failed", steps.get("done"), steps.get("max"), reason)
        self.current = None

    def statuses(self) -> list[RunStatus]:
        statuses = []
        for seed, name in self.planned:
            label = self.label(seed, name)
            if (seed, name) in self.outcomes:
                statuses.append(self.outcomes[seed, name])
            elif (seed, name) == self.current:  # what its folder says, but never stale: it runs now
                statuses.append(running_status(label, self.run_dir(seed, name)))
            else:
                statuses.append(RunStatus(label, "queued"))
        return statuses

    def phase(self) -> str | None:
        if self.evaluating:
            return "Training is over; evaluating the models (the tables below fill in as each is measured)."
        if self.current is not None:
            return f"Training {self.label(*self.current)} in its own process."
        return None


def compare_plan(
    experiment: Experiment, output_dir: str | Path | None = None, seeds: list[int] | None = None,
    only: str | list[str] | None = None,
) -> list[dict[str, Any]]:
    """One independent ``sdtune train`` command per technique × training seed — what ``compare``
    would train — for a cluster scheduler to run anywhere; ``compare --evaluate-only`` then
    evaluates what finished. Each command carries the experiment as resolved here (a file under
    the output folder), so every machine trains exactly the same thing."""
    import yaml

    names = check_comparison(experiment, output_dir, seeds, only, data=False)  # (checked where each run trains)
    root = output_root(experiment, output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    experiment_file = root / "experiment.resolved.yaml"
    atomic.write_text(experiment_file, yaml.safe_dump(experiment.to_dict(), sort_keys=False))
    entries = []
    for seed in seeds or [experiment.train.seed]:
        out = root if seeds is None else root / f"seed-{seed}"
        for name in names:
            command = ["sdtune", "train", str(experiment_file), "--technique", name, "--output", str(out),
                       "--set", f"train.seed={seed}", "--resume"]
            entries.append({"technique": name, "seed": seed, "run_dir": str(out / name), "command": command})
    return entries



def train_or_reuse(
    experiment: Experiment, name: str, out: Path, root: Path, seed: int, progress: bool, train: bool = True,
    stop_after: int | None = None, environment: dict[str, str] | None = None,
) -> dict:
    """Train one technique into ``out/<name>`` (in a fresh process) unless a finished record exists,
    resuming an interrupted run; a failure becomes a 'failed' record that keeps the error, and the
    traceback when it was a bug. The record is also written to ``root/records/train-<name>-seed<seed>.json``.
    With ``stop_after`` the run stops after that step (``interrupted``, checkpointed); ``environment``
    adds variables to the training process's (its thread count)."""
    run_dir = out / name
    record = records.read_record(run_dir)
    if not train and (record is None or record.get("status") != "finished"):
        record = {
            "kind": "train", "status": "missing", "error": f"no finished run in {run_dir} (--evaluate-only)",
            "technique": {"name": name, "kind": experiment.techniques[name].kind}, "seeds": {"train": seed},
            "config": experiment.to_dict(),
        }
    elif record is None or record.get("status") != "finished":
        try:
            # resume an interrupted run; otherwise the folder holds nothing finished (a failure's log)
            resumable = (run_dir / "checkpoints").exists()
            options = {"resume": True if resumable else None, "overwrite": not resumable, "progress": progress}
            if launched_processes() > 1:  # under a launcher: in the launched processes (see sdtune.training.loop.train)
                record = _train_here(experiment, name, out, {**options, "stop_after": stop_after})
            else:
                record = train_in_fresh_process(experiment, name, out, stop_after=stop_after, environment=environment, **options)
        except TechniqueFailed as error:  # one technique failing must not lose the others' results
            run_dir.mkdir(parents=True, exist_ok=True)
            # the one-line reason first (the live report shows it), then a bug's traceback
            atomic.write_text(run_dir / ERROR_FILE, f"{error}\n" + (f"\n{error.details}" if error.details else ""))
            kind = "error" if error.user_error else "crash (a bug in sdtune; traceback in error.log)"
            print(f"technique {name} (seed {seed}) failed: {error} [{kind}]")
            record = {
                "kind": "train", "status": "failed", "error": str(error)[:500], "traceback": error.details,
                "technique": {"name": name, "kind": experiment.techniques[name].kind},
                "seeds": {"train": seed}, "config": experiment.to_dict(),
            }
    record["run_dir"] = str(run_dir)
    if launch_rank() == 0:  # one writer under a launcher (every process reads the same record)
        records.write_record(root / RECORDS_DIR / f"train-{name}-seed{seed}.json", record)
    return record


def _train_here(experiment: Experiment, name: str, out: Path, options: dict) -> dict:
    """Train in this process; an exception becomes a TechniqueFailed like a child process's."""
    try:
        return train_technique(experiment, name, out, **options).record
    except UserError as error:
        raise TechniqueFailed(name, str(error), None, True) from error
    except Exception as error:
        raise TechniqueFailed(name, f"{type(error).__name__}: {error}", traceback.format_exc(), False) from error
