"""What the trained-what-it-claims check costs the training loop, on the demo model (`sdtune demo`'s
base, data and settings, fewer steps): each technique trains with the check and with its per-step
part switched off (`GradientWitness.observe`/`collect` as no-ops), alternately, in fresh processes;
reported are the steady seconds per step of each (the record's `timing.steady_s_per_step`, wall
time: on a shared machine it moves with the load), the median CPU seconds of the process per step
after the second (`time.process_time` between steps: what the process itself spent, whatever the
load), the seconds spent inside the witness over the whole run (timed around its calls), the steps it watched
(`checks.trained.gradient_watch_steps`), and the one-off costs: the digests at setup
(`timing.check_digest_time_s`), the check itself and the anatomy at the end.

    python benchmarks/trained_check_overhead.py --work /tmp/overhead [--steps 30] [--repeats 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(work: Path, technique: str, witness: bool, steps: int) -> dict:
    import sdtune
    from sdtune.demo.run import DemoSettings, demo_experiment
    from sdtune.training import trained_check

    spent = [0.0]
    for method in ("observe", "collect"):
        original = getattr(trained_check.GradientWitness, method)

        def timed(self, *args, _original=original, **kwargs):
            if not witness:
                return None
            started = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        setattr(trained_check.GradientWitness, method, timed)
    settings = DemoSettings(max_train_steps=steps, every_steps=None, techniques=("full", "lora"))
    path = demo_experiment(work, settings)
    experiment = sdtune.load_experiment(path, ["train.log_every=5"])
    out = work / f"{technique}-{'with' if witness else 'without'}"
    marks = []
    result = sdtune.train_technique(experiment, technique, output_dir=out, overwrite=True, progress=False,
                                    after_step=lambda step: marks.append(time.process_time()))
    cpu_per_step = statistics.median(b - a for a, b in zip(marks[2:], marks[3:]))
    record = result.record
    check = record["checks"]["trained"]
    return {
        "technique": technique, "witness": witness, "steady_s_per_step": record["timing"]["steady_s_per_step"],
        "cpu_s_per_step": cpu_per_step,
        "witness_s": spent[0], "watch_steps": check["gradient_watch_steps"], "passed": check["passed"],
        "digest_s": record["timing"]["check_digest_time_s"], "check_s": check["time_s"],
        "anatomy_s": record["anatomy"]["time_s"], "steps": record["steps"]["done"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--technique", action="append")
    parser.add_argument("--child", nargs=2, metavar=("TECHNIQUE", "WITNESS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.work, args.child[0], args.child[1] == "on", args.steps)))
        return
    runs = []
    for _ in range(args.repeats):
        for technique in args.technique or ["full", "lora"]:
            for witness in ("on", "off"):
                command = [sys.executable, __file__, "--work", str(args.work), "--steps", str(args.steps),
                           "--child", technique, witness]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs.append({**json.loads(output.strip().splitlines()[-1]), "load_average": os.getloadavg()[0]})
                print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for technique in args.technique or ["full", "lora"]:
        mine = [r for r in runs if r["technique"] == technique]
        summary[technique] = {
            "steady_s_per_step_with": statistics.median(r["steady_s_per_step"] for r in mine if r["witness"]),
            "steady_s_per_step_without": statistics.median(r["steady_s_per_step"] for r in mine if not r["witness"]),
            "cpu_s_per_step_with": statistics.median(r["cpu_s_per_step"] for r in mine if r["witness"]),
            "cpu_s_per_step_without": statistics.median(r["cpu_s_per_step"] for r in mine if not r["witness"]),
            "witness_s_per_run": statistics.median(r["witness_s"] for r in mine if r["witness"]),
            "watch_steps": max(r["watch_steps"] or 0 for r in mine if r["witness"]),
        }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
