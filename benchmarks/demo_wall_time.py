"""Wall time of the whole built-in demo (`sdtune demo`), with the share of each phase.

    python benchmarks/demo_wall_time.py [--output DIR]

Budget (issue 4): the whole demo in ≤ 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    from sdtune.demo.run import run_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="keep the demo output here (default: a temp folder)")
    args = parser.parse_args()
    output = Path(args.output or tempfile.mkdtemp(prefix="sdtune-demo-bench-")) / "demo-output"
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    report = run_demo(output, progress=False)
    total = time.perf_counter() - started
    records = [json.loads(p.read_text()) for p in (report.parent / "records").glob("*.json")]
    train = sum(r["timing"]["setup_time_s"] + r["timing"]["train_time_s"] for r in records if r["kind"] == "train")
    generation = sum(r["generation"]["load_time_s"] + sum(r["generation"]["latencies_s"]) for r in records if r["kind"] == "eval")
    print(f"sdtune demo: {total:.0f} s wall ({total / 60:.1f} min) on {torch.get_num_threads()} threads")
    print(f"  training (setup + loop, all techniques): {train:.0f} s")
    print(f"  generation (load + sampling, all models): {generation:.0f} s")
    print(f"  the rest (data, caching, metrics, report): {total - train - generation:.0f} s")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
