"""Wall time and CPU time of the whole built-in demo (`sdtune demo`), with the share of each phase.

    python benchmarks/demo_wall_time.py [--output DIR]

Budget (issues 4 and 21): the whole demo in ≤ 10 minutes on 2 CPU cores. The machine is often
shared, so besides the wall time it prints the CPU time of this process and of its children (the
techniques' training processes), which another job's load changes far less than the wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its finished children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    from sdtune.demo.run import run_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="keep the demo output here (default: a temp folder)")
    args = parser.parse_args()
    output = Path(args.output or tempfile.mkdtemp(prefix="sdtune-demo-bench-")) / "demo-output"
    shutil.rmtree(output, ignore_errors=True)
    started, parent_cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    report = run_demo(output, progress=False)
    total = time.perf_counter() - started
    parent_cpu = cpu_seconds(resource.RUSAGE_SELF) - parent_cpu
    children_cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    records = [json.loads(p.read_text()) for p in (report.parent / "records").glob("*.json")]
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    train = sum(r["timing"]["setup_time_s"] + r["timing"]["train_time_s"] for r in train_records)
    in_training = sum(e["generation"]["time_s"] for r in train_records for e in r["evaluation"] if e.get("generation"))
    final = [r for r in eval_records if r.get("step") is None]
    generation = sum(r["generation"]["load_time_s"] + sum(r["generation"]["latencies_s"]) for r in final)
    images = sum(len(r["images"]) for r in eval_records)
    print(f"sdtune demo: {total:.0f} s wall ({total / 60:.1f} min) on {torch.get_num_threads()} threads")
    print(f"  CPU time: {parent_cpu:.0f} s in this process, {children_cpu:.0f} s in the training processes")
    print(f"  training processes (setup + loop, all techniques): {train:.0f} s, of which "
          f"{in_training:.0f} s generating images at the intermediate steps")
    print(f"  generation of the finished models (load + sampling): {generation:.0f} s")
    print(f"  the rest (process start-up, data, caching, metrics, report): {total - train - generation:.0f} s")
    print(f"  images measured: {images} ({len(final)} finished models, {len(eval_records) - len(final)} intermediate steps)")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
