"""``sdtune tune``: each technique at its own learning rate, chosen on the validation split with an
equal budget, then compared both ways.

1. **Trials** (:mod:`.plan`): every technique × every learning rate of its range, each a normal run
   in its own folder (``trials/<technique>/lr-<rate>/``) with the same data order, seeds, steps and
   samples; the grid runs them all, asha (Ray Tune) stops the worst at each rung.
2. **Selection** (:mod:`.select`): per technique the best trial on the validation split only; the
   typed record ``tuning.json`` keeps every trial's score, the choice, the rule and the budget.
3. **Finals**: each technique at its chosen rate and at the shared ``train.learning_rate``, over
   ``tuning.seeds``, trained and fully evaluated as two comparisons (``finals/tuned``, ``finals/shared``),
   so that the report's two tables come from the same data.

Everything is resumable: a finished trial or final run is never trained again, an interrupted one
resumes from its checkpoint, and a changed experiment is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdtune import records
from sdtune.config import VALIDATION_LOSS, ConfigError
from sdtune.errors import UserError
from sdtune.experiment import Experiment
from sdtune.preflight import check_tuning
from sdtune.report.live import LiveReport, RunStatus, running_status
from sdtune.report.tuning import render_tuning_report
from sdtune.training import output_root
from sdtune.tuning import plan
from sdtune.tuning.jobs import Job, evaluate_arm, read_validation_score
from sdtune.tuning.local import LocalEngine
from sdtune.tuning.select import technique_summary, trial_entry, validation_curve

ENGINES = ("local", "ray")


class TuningInterrupted(UserError, RuntimeError):
    """Ctrl-C during ``sdtune tune``: the running runs were checkpointed; rerunning resumes them."""


class TuningMismatch(UserError, RuntimeError):
    """The output folder holds runs of another study (the experiment or its tuning section changed)."""


def tune(
    experiment: Experiment,
    output_dir: str | Path | None = None,
    engine: str = "local",
    address: str | None = None,
    max_concurrent: int = 1,
    only: list[str] | None = None,
    progress: bool = True,
    finals: bool = True,
) -> Path:
    """Tune each technique's learning rate on the validation split, train the final runs at the chosen
    and at the shared rate over ``tuning.seeds``, evaluate them and write the report; returns its path.

    ``engine``: ``local`` (sdtune's isolated processes, ``max_concurrent`` at a time) or ``ray`` (Ray
    tasks; Ray Tune's ASHAScheduler for ``scheduler: asha``; a local Ray is started and shut down
    unless ``address`` names a cluster or Ray is already initialised). ``only``: these techniques.
    ``finals=False`` stops after the selection. Rerunning resumes: nothing finished is trained again.
    """
    names = _checked(experiment, engine, address, max_concurrent, only, output_dir)
    root = output_root(experiment, output_dir).resolve()
    selection = open_selection(experiment, root, engine)
    runner = _engine(engine, root, max_concurrent, address)
    try:
        with LiveStatus(root) as live:
            selection = run_trials(experiment, root, names, runner, selection, live)
            if finals:
                run_finals(experiment, root, names, runner, selection, live, progress)
    finally:
        runner.close()
    return render_tuning_report(root)


def tune_plan(experiment: Experiment, output_dir: str | Path | None = None, only: list[str] | None = None) -> list[dict[str, Any]]:
    """The trials and final runs of :func:`tune`, each with the ``sdtune train`` command that runs it
    elsewhere (the experiment files they name are written under the output folder). The tuned
    finals have commands once the selection exists (``sdtune tune`` on the finished trials makes it)."""
    names = _checked(experiment, None, None, 1, only, output_dir)
    root = output_root(experiment, output_dir).resolve()
    existing = _existing_selection(experiment, root)
    chosen = {name: ((existing.techniques.get(name) or {}) if existing else {}).get("chosen_learning_rate") for name in names}
    return plan.plan_entries(experiment, root, names, chosen)


def _checked(
    experiment: Experiment, engine: str | None, address: str | None, max_concurrent: int, only: list[str] | None,
    output_dir: str | Path | None,
) -> list[str]:
    """The techniques to tune; every command-line choice checked in one line (``engine`` None: a plan,
    which runs nothing)."""
    tuning = experiment.tuning
    if tuning is None:
        raise ConfigError(
            "the experiment has no tuning: section; add one, e.g. tuning: {learning_rate: {min: 1.0e-5, max: 1.0e-3, "
            "points: 5}} (see docs/fair-comparison.md)"
        )
    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: choose local or ray")
    if tuning.scheduler == "asha" and engine not in ("ray", None):
        raise ConfigError("tuning.scheduler: asha runs on Ray Tune's ASHAScheduler; add --engine ray, or use scheduler: grid")
    if address and engine not in ("ray", None):
        raise ConfigError(f"--address {address!r} names a Ray cluster; add --engine ray")
    if max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {max_concurrent}: give 1 or more runs at a time")
    # names, output folder, data (not for a plan: its runs train elsewhere), launch — before any work
    return check_tuning(experiment, output_dir, only, data=engine is not None)


def _engine(engine: str, root: Path, max_concurrent: int, address: str | None) -> Any:
    if engine == "ray":
        from sdtune.tuning.ray_engine import RayEngine  # (Ray is an optional extra)

        return RayEngine(root, max_concurrent, address)
    return LocalEngine(max_concurrent)


# ------------------------------------------------------------------------------------------------
# The selection record, and one study per output folder


def _existing_selection(experiment: Experiment, root: Path) -> records.TuningRecord | None:
    existing = records.load_tuning(root)
    if existing is not None and existing.fingerprint != plan.fingerprint(plan.fingerprint_parts(experiment)):
        change = plan.first_change(existing.fingerprint_parts, plan.fingerprint_parts(experiment)) or "the experiment"
        raise TuningMismatch(
            f"{root} holds a tuning study of another experiment ({change}); its runs cannot be mixed with this one: "
            "pass --output to write elsewhere, or delete the folder to start over"
        )
    return existing


def open_selection(experiment: Experiment, root: Path, engine: str) -> records.TuningRecord:
    """The output folder's selection record (a new one, or the one there when it is of this study)."""
    existing = _existing_selection(experiment, root)
    if existing is not None:
        return dataclasses.replace(existing, engine=engine)
    assert experiment.tuning is not None
    parts = plan.fingerprint_parts(experiment)
    record = records.TuningRecord(
        experiment=experiment.name, status="trials", tuning=_tuning_summary(experiment), budget={}, techniques={},
        fingerprint=plan.fingerprint(parts), fingerprint_parts=parts, config=experiment.to_dict(), engine=engine,
        scheduler=experiment.tuning.scheduler, versions=records.package_versions(), git_commit=records.git_commit(),
        created_at=_now(),
    )
    root.mkdir(parents=True, exist_ok=True)
    records.write_record(root / records.TUNING_FILE, record)
    return record


def _tuning_summary(experiment: Experiment) -> dict[str, Any]:
    tuning = experiment.tuning
    assert tuning is not None
    return {
        "learning_rates": {name: list(rates) for name, rates in tuning.learning_rates.items()},
        "steps": tuning.steps, "grace_steps": tuning.grace_steps, "reduction_factor": tuning.reduction_factor,
        "select_by": tuning.select_by, "direction": tuning.direction, "seeds": list(tuning.seeds),
        "scheduler": tuning.scheduler, "rank_by": tuning.rank_by, "rank_direction": tuning.rank_direction,
        "pareto": list(tuning.pareto) if tuning.pareto else None, "shared_learning_rate": experiment.train.learning_rate,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# Phase 1: the trials, and the selection


def run_trials(
    experiment: Experiment, root: Path, names: list[str], runner: Any, selection: records.TuningRecord, live: LiveStatus
) -> records.TuningRecord:
    """Run every trial not finished yet, then choose each technique's rate and write ``tuning.json``."""
    tuning = experiment.tuning
    assert tuning is not None
    threads = runner.threads()
    trial_list = plan.trials(experiment, root, names)
    jobs = {trial.label: plan.trial_job(experiment, trial, threads) for trial in trial_list}
    asha = None
    if tuning.scheduler == "asha":
        live.queued(list(jobs.values()))
        asha = {}
        for name in names:
            mine = plan.middle_out([job for job in jobs.values() if job.technique == name])
            asha.update(runner.asha(mine, tuning.steps, tuning.grace_steps, tuning.reduction_factor, root / "ray"))
    else:
        todo = [job for job in jobs.values() if not _trial_done(job)]
        live.queued(todo)
        runner.run(todo, live.event)
    selection = _selection(experiment, root, names, trial_list, jobs, selection, asha)
    stopped = [label for label, job in jobs.items() if (records.read_record(job.run_dir) or {}).get("status") == "interrupted"
               and not (asha and asha.get(label, {}).get("steps", 0) < tuning.steps)]
    if stopped or runner.interrupted:
        records.write_record(root / records.TUNING_FILE, dataclasses.replace(selection, status="trials"))
        where = f"trial {stopped[0]} was interrupted and checkpointed" if stopped else "the trials were interrupted"
        raise TuningInterrupted(f"{where}; run the same `sdtune tune` again to resume (finished trials are kept)")
    records.write_record(root / records.TUNING_FILE, selection)
    _print_selection(selection, names)
    return selection


def _trial_done(job: Job) -> bool:
    """A finished trial (measured, for a metric selection) needs no process; a failed one (a crash, a start
    cut by Ctrl-C, a diverging rate) is tried again."""
    if not job.record_path.exists() or records.read_record_file(job.record_path).status != "finished":
        return False
    return job.select_by == VALIDATION_LOSS or read_validation_score(job) is not None


def _selection(
    experiment: Experiment, root: Path, names: list[str], trial_list: list[plan.Trial], jobs: dict[str, Job],
    selection: records.TuningRecord, asha: dict[str, Any] | None,
) -> records.TuningRecord:
    """The selection record: every trial's entry (from its record), each technique's choice, the budget."""
    tuning = experiment.tuning
    assert tuning is not None
    techniques = dict(selection.techniques)
    for name in names:
        entries, steps = [], []
        for trial in (t for t in trial_list if t.technique == name):
            job = jobs[trial.label]
            record = _trial_record(job)
            _check_trial(record, trial, tuning.steps)
            entry = trial_entry(record, trial.learning_rate, tuning.select_by, read_validation_score(job), root,
                                job.record_path, tuning.steps)
            ran = (asha or {}).get(trial.label)
            if ran is not None and ran["steps"] < tuning.steps:  # asha stopped it at a rung
                entry.update(status="stopped", complete=False, stopped_at=ran["steps"], steps=ran["steps"], score=None)
            entries.append(entry)
            steps.append(ran["steps"] if ran is not None else entry.get("steps") or 0)
        techniques[name] = technique_summary(entries, tuning.direction, experiment.train.learning_rate, steps)
    return dataclasses.replace(
        selection, status="selected", techniques=techniques, budget=_budget(experiment, jobs),
        asha=None if asha is None else {"reported": asha}, finished_at=_now(),
    )


def _trial_record(job: Job) -> dict[str, Any] | None:
    """A trial's record: its run's when finished, else the one its folder's records/ keeps (a failed
    start leaves no run record), else the run's (trained elsewhere, from --plan)."""
    run = records.read_record(job.run_dir)
    if (run or {}).get("status") != "finished" and job.record_path.exists():
        return dataclasses.asdict(records.read_record_file(job.record_path))
    return run


def _check_trial(record: dict[str, Any] | None, trial: plan.Trial, steps: int) -> None:
    if record is None or record["status"] == "failed":
        return
    trained = (record.get("train") or {}).get("learning_rate")
    planned = (record.get("steps") or {}).get("max")
    if trained != trial.learning_rate or planned != steps:
        raise TuningMismatch(
            f"{trial.root} holds a run at learning rate {trained} for {planned} steps, not the trial's "
            f"{trial.learning_rate} for {steps}; delete that folder or pass --output to write elsewhere"
        )


def _budget(experiment: Experiment, jobs: dict[str, Job]) -> dict[str, Any]:
    """The budget every technique shared, measured from the trials' records where they say it."""
    tuning = experiment.tuning
    assert tuning is not None
    found = [records.read_record(job.run_dir) for job in jobs.values() if job.run_dir.exists()]
    found = [r for r in found if r]
    per_step = next((r["timing"]["images_per_step"] for r in found if r.get("timing")), None)
    images = next((e["validation_images"] for r in found for e in r.get("evaluation") or [] if e.get("validation_images")), None)
    per_technique = {len(rates) for rates in tuning.learning_rates.values()}
    return {
        "trials_per_technique": per_technique.pop() if len(per_technique) == 1 else sorted(per_technique),
        "steps_per_trial": tuning.steps,
        "samples_per_step": per_step,
        "samples_per_trial": per_step * tuning.steps if per_step else None,
        "seed": experiment.train.seed,
        "selection_split": {"validation_images": images, "data.validation": experiment.data.validation},
        "select_by": tuning.select_by,
        "scheduler": tuning.scheduler,
        "held_equal": ["trials per technique", "optimizer steps per trial", "samples per step",
                       "data order, noise and timesteps (one seed)", "validation images, noise and timesteps"],
    }


def _print_selection(selection: records.TuningRecord, names: list[str]) -> None:
    for name in names:
        entry = selection.techniques[name]
        scores = ", ".join(
            f"{plan.rate_label(t['learning_rate'])}: " + (f"{t['score']:.4g}" if t.get("score") is not None else t["status"])
            for t in entry["trials"]
        )
        chosen = entry["chosen_learning_rate"]
        edge = f" (at the {entry['at_edge']} edge of the range: widen it)" if entry.get("at_edge") else ""
        print(f"{name}: {scores} → {plan.rate_label(chosen) if chosen else 'no finished trial'}{edge}", flush=True)


# ------------------------------------------------------------------------------------------------
# Phase 2: the final runs at the chosen and at the shared rate


def run_finals(
    experiment: Experiment, root: Path, names: list[str], runner: Any, selection: records.TuningRecord,
    live: LiveStatus, progress: bool,
) -> None:
    """Train every final run not finished yet — a final identical to a run already made (its trial, or the
    shared run at the same rate) is that run, linked —, evaluate each arm as a comparison, and mark the
    selection finished."""
    tuning = experiment.tuning
    assert tuning is not None
    chosen = {name: selection.techniques[name]["chosen_learning_rate"] for name in names}
    lost = [name for name in names if chosen[name] is None]
    if lost:
        raise UserError(
            f"no trial of {lost[0]} finished with a score (failed or diverged: see {root / plan.TRIALS_DIR / lost[0]}); "
            "move its tuning.learning_rate range lower"
        )
    rates = {"shared": dict.fromkeys(names, experiment.train.learning_rate), "tuned": chosen}
    arms = {arm: plan.arm_experiment(experiment, names, rates[arm]) for arm in plan.ARMS}
    final_list = plan.finals(experiment, root, names, chosen)
    _check_finals(final_list, selection)
    sources = {final: source for final in final_list if (source := _same_run(experiment, root, final, rates))}
    jobs = [plan.final_job(arms[f.arm], f, runner.threads()) for f in final_list if f not in sources]
    todo = [job for job in jobs if (records.read_record(job.run_dir) or {}).get("status") != "finished"]
    live.queued(todo)
    done = runner.run(todo, live.event)
    if runner.interrupted or any(record["status"] == "interrupted" for record in done):
        raise TuningInterrupted("a final run was interrupted and checkpointed; run the same `sdtune tune` again to resume")
    for final, source in sources.items():  # the same run, trained once
        _link(final.out / final.technique, source)
    retrained = {Path(job.root).name for job in todo}
    finals_entry = dict(selection.finals)
    for arm in plan.ARMS:
        arm_root = root / plan.FINALS_DIR / arm
        evaluated = plan.fingerprint(arms[arm].to_dict()["evaluation"])
        stale = arm in retrained or (finals_entry.get(arm) or {}).get("evaluation") != evaluated
        if stale or not _evaluated(arm_root, names, tuning.seeds):
            runner.call(evaluate_arm, arms[arm].to_dict(), str(arm_root), list(tuning.seeds), progress)
        finals_entry[arm] = {"root": str(arm_root.relative_to(root)), "learning_rates": rates[arm], "evaluation": evaluated}
    records.write_record(root / records.TUNING_FILE, dataclasses.replace(selection, status="finished", finals=finals_entry))


def _same_run(experiment: Experiment, root: Path, final: plan.Final, rates: dict[str, dict[str, float]]) -> Path | None:
    """A run already made that this final run would repeat exactly (training is deterministic and the
    evaluation settings change nothing it computes): the finished trial at its rate when its seed is the
    trials' and the trials are as long as the final runs; else, for a tuned rate equal to the shared one,
    the shared run. None: it must be trained."""
    tuning = experiment.tuning
    assert tuning is not None and final.learning_rate is not None
    train = experiment.train_config_for(final.technique)
    if final.seed == experiment.train.seed and train.max_train_steps == tuning.steps and train.num_epochs is None \
            and final.learning_rate in tuning.learning_rates[final.technique]:
        trial = plan.Trial(final.technique, final.learning_rate, root / plan.TRIALS_DIR / final.technique
                           / f"lr-{plan.rate_label(final.learning_rate)}")
        if (records.read_record(trial.root / final.technique) or {}).get("status") == "finished":
            return trial.root / final.technique
    if final.arm == "tuned" and final.learning_rate == rates["shared"][final.technique]:
        return root / plan.FINALS_DIR / "shared" / f"seed-{final.seed}" / final.technique
    return None


def _check_finals(final_list: list[plan.Final], selection: records.TuningRecord) -> None:
    """A finished final run at another rate than the one chosen now (the selection changed) is refused."""
    for final in final_list:
        record = records.read_record(final.out / final.technique)
        if record and record["status"] == "finished" and record["train"]["learning_rate"] != final.learning_rate:
            raise TuningMismatch(
                f"{final.out / final.technique} was trained at {record['train']['learning_rate']}, but the {final.arm} rate "
                f"of {final.technique} is now {final.learning_rate}; delete {final.root} to train the final runs again"
            )


def _link(path: Path, target: Path) -> None:
    if path.is_symlink() or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, path.parent), path, target_is_directory=True)


def _evaluated(arm_root: Path, names: list[str], seeds: tuple[int, ...]) -> bool:
    folder = arm_root / "records"
    expected = ["eval-base.json", *(f"eval-{name}-seed{seed}.json" for name in names for seed in seeds)]
    return all((folder / name).exists() for name in expected)


# ------------------------------------------------------------------------------------------------
# Watching it live


class LiveStatus:
    """Each run's state (queued, running at step N, finished, failed), shown in the live report as it
    changes: at every event, and every few seconds while runs train (a running run's step is read from
    its folder's ``progress.json``, :func:`run_status`). Use it as a context manager around the job."""

    def __init__(self, root: Path) -> None:
        self.root, self.lock = root, threading.Lock()
        self.statuses: dict[str, RunStatus] = {}
        self.running: dict[str, Job] = {}
        self.report = LiveReport(root, self.current)

    def __enter__(self) -> LiveStatus:
        self.report.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.report.__exit__(*exc_info)  # the last page: no more reloading

    def queued(self, jobs: list[Job]) -> None:
        with self.lock:
            for job in jobs:
                self.statuses[job.label] = RunStatus(job.label, "queued")
        self.report.render(done=False)

    def event(self, job: Job, what: str, record: dict[str, Any] | None) -> None:
        with self.lock:
            if record is None:
                self.statuses[job.label] = RunStatus(job.label, "running")
                self.running[job.label] = job
            else:
                steps = record.get("steps") or {}
                state = {"finished": "finished", "failed": "failed"}.get(record["status"], "queued")
                self.statuses[job.label] = RunStatus(job.label, state, steps.get("done"), steps.get("max"), record.get("error"))
                self.running.pop(job.label, None)
                print(_job_line(job, record), flush=True)
        self.report.render(done=False)

    def current(self) -> list[RunStatus]:
        """Every run's status now; a running one at the step its folder reports (never stale: it runs)."""
        with self.lock:
            statuses, running = list(self.statuses.values()), dict(self.running)
        return [
            running_status(status.label, running[status.label].run_dir) if status.label in running else status
            for status in statuses
        ]


def _job_line(job: Job, record: dict[str, Any]) -> str:
    curve = validation_curve(record)
    loss = f", validation loss {curve[-1]['validation_loss']:.4g}" if curve else ""
    wall = (record.get("timing") or {}).get("job_wall_time_s")
    took = f" ({wall:.0f} s)" if wall else ""
    done = (record.get("steps") or {}).get("done")
    error = f": {record['error']}" if record.get("error") else ""
    return f"{job.label}: {record['status']}{f' at step {done}' if done is not None else ''}{loss}{took}{error}"
