"""``--engine local`` (the default): the jobs run as sdtune's own isolated training processes on this
machine, ``--max-concurrent`` at a time; no Ray needed.

Ctrl-C reaches the training processes (one terminal process group): each checkpoints and stops, this
process waits for them and starts no new job (a child stopped before its loop began is retried on the
next run); ``sdtune tune`` then says how to resume.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from sdtune.training.run_dir import interrupt_handler
from sdtune.tuning.jobs import Job, run_job, threads_per_run

Event = Callable[[Job, str, dict[str, Any] | None], None]  # (job, "running" | "done", its record)


class LocalEngine:
    """Runs jobs in fresh processes on this machine, ``max_concurrent`` at a time; on a machine with
    several GPUs each running job gets one of its own (``CUDA_VISIBLE_DEVICES``)."""

    name = "local"

    def __init__(self, max_concurrent: int = 1) -> None:
        self.max_concurrent = max_concurrent
        self.stop = threading.Event()  # Ctrl-C: finish (checkpoint) what runs, start nothing new
        self.free_gpus: queue.SimpleQueue[str] | None = None
        gpus = _gpu_count()
        if gpus > 1 and max_concurrent > 1:
            self.free_gpus = queue.SimpleQueue()
            for index in range(gpus):
                self.free_gpus.put(str(index))

    def run(self, jobs: list[Job], on_event: Event) -> list[dict[str, Any]]:
        """Run every job; return their records in the jobs' order (an interrupted job's is
        ``interrupted``; after Ctrl-C no job starts, and :attr:`interrupted` is set)."""
        results: dict[int, dict[str, Any]] = {}

        def one(index: int, job: Job) -> None:
            on_event(job, "running", None)
            gpu = self.free_gpus.get() if self.free_gpus is not None else None  # (more runs than GPUs: one waits)
            try:
                environment = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else None
                results[index] = run_job(job, progress=self.max_concurrent == 1, environment=environment)
            finally:
                if gpu is not None:
                    self.free_gpus.put(gpu)
            on_event(job, "done", results[index])
            if results[index]["status"] == "interrupted":
                self.stop.set()

        # the jobs run in worker threads, so Ctrl-C reaches this thread's handler (and the children)
        with interrupt_handler(lambda signum, frame: self.stop.set()), ThreadPoolExecutor(self.max_concurrent) as pool:
            pending: set[Future] = set()
            queue = list(enumerate(jobs))
            while queue or pending:
                while queue and len(pending) < self.max_concurrent and not self.stop.is_set():
                    pending.add(pool.submit(one, *queue.pop(0)))
                if self.stop.is_set():
                    queue.clear()
                if pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()  # a bug in a job is raised here, with its traceback
        return [results[i] for i in sorted(results)]

    @property
    def interrupted(self) -> bool:
        return self.stop.is_set()

    def threads(self) -> int:
        """Each training process's thread count (see :func:`sdtune.tuning.jobs.threads_per_run`)."""
        return threads_per_run(os.cpu_count() or 1, self.max_concurrent)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` here (the arms' evaluation)."""
        return function(*args)

    def close(self) -> None:
        """Nothing to release (the training processes have ended)."""


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
