"""Wall time and CPU time of the whole built-in demo (`sdtune demo`), with the share of each phase.

    python benchmarks/demo_wall_time.py [--output DIR]
    python benchmarks/demo_wall_time.py --breakdown demo-output   # a demo already run

Budget (issue 21): the plain demo in under 10 minutes on 2 CPU cores. The machine is often shared,
so besides the wall time it prints the CPU time of this process and of its children (the
techniques' training processes), which another job's load changes far less than the wall time, and
the load average before and after. ``--breakdown`` reads an existing demo output's records instead
(to break down a run timed elsewhere, e.g. ``/usr/bin/time -v sdtune demo``): the phases only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its finished children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (runnable processes; 2 means both cores busy here)."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def breakdown(root: Path) -> tuple[list[str], float]:
    """Where a demo's time went, from its records: training processes (of which in-training
    image generation), the finished models' generation, the number of images measured; and the
    seconds those phases account for."""
    records = [json.loads(p.read_text()) for p in (root / "records").glob("*.json")]
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    jobs = sum(r["timing"]["job_wall_time_s"] for r in train_records)  # each from its call to its weights
    loops = sum(r["timing"]["train_time_s"] for r in train_records)
    evaluating = sum(r["timing"].get("evaluation_time_s", 0.0) for r in train_records)
    in_training = sum(e["generation"]["time_s"] for r in train_records for e in r["evaluation"] if e.get("generation"))
    # the compare process's evaluations (base and finished models) time each image; the images a
    # training process generated at an intermediate step are its "live model" entries
    final = [r for r in eval_records if "latencies_s" in (r.get("generation") or {})]
    generation = sum(r["generation"]["load_time_s"] + sum(r["generation"]["latencies_s"]) for r in final)
    images = sum(len(r["images"]) for r in eval_records)
    final_images = sum(len(r["images"]) for r in final)
    return [
        f"  training jobs (all techniques, each from its start to its saved weights): {jobs:.0f} s, of which "
        f"{loops:.0f} s the step loops, {evaluating:.0f} s evaluating while training (validation losses; "
        f"{in_training:.0f} s of it the images at the intermediate steps)",
        f"  generation of the finished models (load + sampling): {generation:.0f} s",
        f"  images measured: {images} ({final_images} of {len(final)} finished models, "
        f"{images - final_images} of {len(eval_records) - len(final)} intermediate steps)",
    ], jobs + generation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="keep the demo output here (default: a temp folder)")
    parser.add_argument("--breakdown", metavar="DIR", help="only break down the demo output in DIR (nothing runs)")
    args = parser.parse_args()
    if args.breakdown:
        lines, _ = breakdown(Path(args.breakdown))
        print("\n".join(lines))
        return 0

    import torch

    from sdtune.demo.run import run_demo

    output = Path(args.output or tempfile.mkdtemp(prefix="sdtune-demo-bench-")) / "demo-output"
    shutil.rmtree(output, ignore_errors=True)
    load_before = load_average()
    started, parent_cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    report = run_demo(output, progress=False)
    total = time.perf_counter() - started
    parent_cpu = cpu_seconds(resource.RUSAGE_SELF) - parent_cpu
    children_cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    lines, accounted = breakdown(report.parent)
    print(f"sdtune demo: {total:.0f} s wall ({total / 60:.1f} min), torch threads {torch.get_num_threads()}")
    print(f"  CPU time: {parent_cpu:.0f} s in this process, {children_cpu:.0f} s in the training processes")
    print(f"  load average (1, 5, 15 min) before: {load_before}, after: {load_average()}")
    print("\n".join(lines))
    print(f"  the rest (processes starting, imports, metrics, report): {total - accounted:.0f} s")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
