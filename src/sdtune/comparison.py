"""``sdtune compare``: train every technique, evaluate every model, write the report.

This module only orchestrates: which runs to train (or reuse, or mark failed/missing) and which
models to evaluate. :mod:`sdtune.evaluation.evaluate` turns one model into images, metrics and an eval record;
everything measured lands in ``DIR/records/*.json`` (one per training run, one per evaluated model
and evaluated step); :func:`sdtune.report.render.render_report` builds the report from those files alone.
"""

from __future__ import annotations

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
    runs = []
    for seed in train_seeds:
        seeded = experiment.with_seed(seed)
        out = root if seeds is None else root / f"seed-{seed}"
        for name in names:
            runs.append(train_or_reuse(seeded, name, out, root, seed, progress, train=not evaluate_only))
            if runs[-1]["status"] == "interrupted":
                raise ComparisonInterrupted(
                    f"{name} was interrupted and checkpointed; run the same `sdtune compare` again to resume"
                )
    # evaluation: every launched process generates its share of the images; the main one measures
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
    if not state.is_main_process:
        return root / "report.html"
    return render_report(root)


def compare_plan(
    experiment: Experiment, output_dir: str | Path | None = None, seeds: list[int] | None = None,
    only: str | list[str] | None = None,
) -> list[dict[str, Any]]:
    """One independent ``sdtune train`` command per technique × training seed — what ``compare``
    would train — for a cluster scheduler to run anywhere; ``compare --evaluate-only`` then
    evaluates what finished. Each command carries the experiment as resolved here (a file under
    the output folder), so every machine trains exactly the same thing."""
    import yaml

    names = check_comparison(experiment, output_dir, seeds, only)
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
            atomic.write_text(run_dir / "error.log", error.details or f"{error}\n")
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
