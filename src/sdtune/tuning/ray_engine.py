"""``--engine ray``: the jobs run as Ray tasks, and ``scheduler: asha`` as Ray Tune trials under its
``ASHAScheduler``, on a local Ray (started here with this machine's CPUs and GPUs, shut down at the
end) or on an existing cluster (``--address``).

Each task runs :func:`sdtune.tuning.jobs.run_job`, the same function as the local engine: a fresh
``sdtune train`` process with the same seeds and thread count, so a grid gives the same records on
both engines. One GPU per task on machines that have GPUs. Every node reads and writes the output
folder, so it must be on storage all of them mount (checked before anything runs).

An asha trial trains to each rung (``stop_after``: checkpointed there), reports the validation loss
measured at that step, and resumes only if the scheduler keeps it; a rung already in the trial's
record (an earlier, interrupted ``sdtune tune``) is reported without training again, so rerunning
replays the same decisions and trains only what is missing.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sdtune import records
from sdtune.errors import UserError
from sdtune.tuning.jobs import Job, run_job, threads_per_run
from sdtune.tuning.select import loss_at
from sdtune.util import atomic

INSTALL = "pip install 'sdtune[ray]'"
SCORE = "validation_loss"  # what an asha trial reports at each rung (lower is better)


class RayMissing(UserError, ImportError):
    """--engine ray without Ray installed."""


class SharedStorageError(UserError, RuntimeError):
    """The output folder is not visible from every node of the Ray cluster."""


def require_ray() -> Any:
    """The ray module, or one line naming the install command."""
    try:
        import ray
        import ray.tune  # noqa: F401  (the extra installs both)
    except ImportError:
        raise RayMissing(f"--engine ray needs Ray, which is not installed; {INSTALL}") from None
    return ray


def asha_rungs(steps: int, grace_steps: int, reduction_factor: int) -> list[int]:
    """The steps an asha trial reports at: Ray's ``ASHAScheduler`` milestones (grace × η^k, computed as
    Ray computes them, ``async_hyperband._Bracket``), then the trial's last step."""
    count = int(np.log(steps / grace_steps) / np.log(reduction_factor) + 1)
    milestones = sorted({int(grace_steps * reduction_factor**k) for k in range(count)} | {steps})
    return [step for step in milestones if step <= steps]


class RayEngine:
    """Runs jobs as Ray tasks (see the module docstring); :meth:`close` shuts down a Ray it started."""

    name = "ray"

    def __init__(self, root: Path, max_concurrent: int = 1, address: str | None = None) -> None:
        ray = self.ray = require_ray()
        self.max_concurrent = max_concurrent
        self.started = False
        self.interrupted = False  # Ctrl-C: the running tasks were cancelled
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address:
                ray.init(address=address, **options)
            else:  # this machine's CPUs and GPUs (Ray detects them)
                ray.init(**options)
            self.started = True
        try:
            self.gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            check_shared_storage(ray, root)
        except BaseException:
            self.close()
            raise

    def run(self, jobs: list[Job], on_event: Callable[[Job, str, dict | None], None]) -> list[dict[str, Any]]:
        """Run every job as a Ray task, ``max_concurrent`` at a time; records in the jobs' order. On
        Ctrl-C the running tasks are cancelled (their training processes end; the last checkpoint stays)."""
        ray = self.ray
        remote = ray.remote(_job_task)
        results: dict[int, dict[str, Any]] = {}
        running: dict[Any, tuple[int, Job]] = {}
        queue = list(enumerate(jobs))
        try:
            while queue or running:
                while queue and len(running) < self.max_concurrent:
                    index, job = queue.pop(0)
                    task = remote.options(num_cpus=job.threads, num_gpus=self.gpus, max_retries=0)
                    running[task.remote(job)] = (index, job)
                    on_event(job, "running", None)
                done, _ = ray.wait(list(running), num_returns=1)
                index, job = running.pop(done[0])
                results[index] = ray.get(done[0])
                on_event(job, "done", results[index])
        except KeyboardInterrupt:
            for reference in running:
                ray.cancel(reference)  # the task's training process is ended with it (the last checkpoint stays)
            self.interrupted = True
        return [results[i] for i in sorted(results)]

    def asha(self, jobs: list[Job], steps: int, grace_steps: int, reduction_factor: int,
             storage: Path) -> dict[str, dict[str, Any]]:
        """One technique's trials under Ray Tune's ``ASHAScheduler`` (lower validation loss is better);
        returns, per job label, the last step each trial reported (the steps it trained) and its score."""
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="step", metric=SCORE, mode="min", max_t=steps, grace_period=grace_steps,
            reduction_factor=reduction_factor,
        )
        rungs = asha_rungs(steps, grace_steps, reduction_factor)
        trainable = tune.with_resources(_asha_trial, {"cpu": jobs[0].threads, "gpu": self.gpus})
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search([dataclasses.asdict(job) for job in jobs]), "rungs": rungs},
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=self.max_concurrent),
            run_config=tune.RunConfig(name=f"asha-{jobs[0].technique}", storage_path=str(storage.resolve()), verbose=0),
        )
        outcome = {}
        for result in tuner.fit():
            label = result.config["job"]["label"]
            history = result.metrics_dataframe
            reported = [] if history is None or history.empty else history[["step", SCORE]].to_dict("records")
            outcome[label] = {"reported": [{"step": int(r["step"]), SCORE: r[SCORE]} for r in reported],
                              "steps": int(reported[-1]["step"]) if reported else 0}
        return outcome

    def threads(self) -> int:
        """Each training process's thread count: ``OMP_NUM_THREADS`` when set here, else the CPUs of the
        largest node shared among the runs at a time (a task asks Ray for that many CPUs)."""
        largest = int(max((node["Resources"].get("CPU", 0) for node in self.ray.nodes() if node.get("Alive")), default=1))
        return max(1, min(threads_per_run(largest, self.max_concurrent), largest))  # (a task asking for more never runs)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` as one Ray task (with a GPU where there are GPUs): the arms' evaluation."""
        remote = self.ray.remote(function).options(num_cpus=self.threads(), num_gpus=self.gpus, max_retries=0)
        return self.ray.get(remote.remote(*args))

    def close(self) -> None:
        """Shut down the Ray this engine started (a cluster it joined keeps running)."""
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False


def check_shared_storage(ray: Any, root: Path) -> None:
    """Every alive node must see the output folder: a marker written here is looked for by one task
    on each node; a node that cannot see it is one line naming it and the fix."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root.mkdir(parents=True, exist_ok=True)
    marker = root.resolve() / f".sdtune-storage-check-{uuid.uuid4().hex[:8]}"
    atomic.write_text(marker, "sdtune\n")  # (removed below: not a result, never read by anything else)
    try:
        remote = ray.remote(_sees)
        checks = {
            node["NodeID"]: remote.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker))
            for node in ray.nodes() if node.get("Alive")
        }
        blind = [node for node, reference in checks.items() if not ray.get(reference)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise SharedStorageError(
            f"--output {root.resolve()} is not visible from Ray node {blind[0][:12]} ({len(blind)} of {len(checks)} "
            "nodes); put the output folder on storage every node mounts (NFS, a shared volume) at the same path"
        )


def _sees(path: str) -> bool:
    return os.path.exists(path)


def _job_task(job: Job) -> dict[str, Any]:
    """A Ray task: one job (a KeyboardInterrupt from ray.cancel ends its training process with it)."""
    return run_job(job)


def _asha_trial(config: dict[str, Any]) -> None:
    """A Ray Tune trial: train to each rung in turn (reusing what the trial's record already holds) and
    report the validation loss there; the scheduler ends the trial when it is not among the best."""
    from ray import tune

    job = Job(**config["job"])
    final = config["rungs"][-1]
    for rung in config["rungs"]:
        record = records.read_record(job.run_dir)
        done = (record or {}).get("steps", {}).get("done", 0) if record else 0
        if record is None or done < rung or record["status"] not in ("finished", "interrupted"):
            record = run_job(dataclasses.replace(job, stop_after=None if rung == final else rung))
        score = loss_at(record, rung) if record["status"] in ("finished", "interrupted") else None
        if score is None or not np.isfinite(score):
            return  # diverged or failed: it reports nothing more, and cannot be chosen
        tune.report({SCORE: score, "step": rung})
