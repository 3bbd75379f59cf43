"""Peak memory and step time with and without each memory saver, each run in its own fresh process.

The model is SD 1.5's architecture with random weights (``sdtune.testing.tiny.build_sd15_architecture``:
the 860 M UNet, 84 M VAE, CLIP-L text transformer). Each variant is one ``sdtune train`` process (a
process's peak RSS only grows, so nothing is shared between measurements); its record gives the
peak (``memory.peak``: CPU peak RSS, or CUDA max allocated) and the steady step time
(``timing.s_per_step``). On a CPU the CUDA-only savers are refused by sdtune itself and listed as
such; with a GPU every variant runs.

    nice -n 10 python benchmarks/memory_savers.py --resolution 128 --steps 3 --out benchmarks/results/memory_savers-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sdtune.records import git_commit
from sdtune.util import atomic

# variant → (technique kind, train keys); every variant: batch 1, no accumulation, no clipping (so
# fused backward applies), fp32 on a CPU / bf16 on a GPU
VARIANTS = {
    "full": ("full", {}),
    "full + gradient checkpointing": ("full", {"gradient_checkpointing": True}),
    "full + adamw8bit": ("full", {"optimizer": "adamw8bit"}),
    "full + fused backward": ("full", {"fused_backward": True}),
    "full + paged_adamw8bit": ("full", {"optimizer": "paged_adamw8bit"}),
    "full + optimizer offload": ("full", {"optimizer_offload": True}),
    "full + free encoders": ("full", {"free_encoders": True}),
    "lora": ("lora", {}),
    "lora + gradient checkpointing": ("lora", {"gradient_checkpointing": True}),
    "lora + free encoders": ("lora", {"free_encoders": True}),
}


def machine() -> dict:
    import torch

    from sdtune.records import device_description

    return device_description(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def experiment_file(work: Path, variant: str, resolution: int, steps: int, gpu: bool) -> Path:
    kind, keys = VARIANTS[variant]
    raw = {
        "name": "savers", "model": str(work / "sd15-arch"), "output_dir": str(work / "runs" / variant.replace(" ", "_")),
        "data": {"source": str(work / "data"), "resolution": resolution, "center_crop": True, "cache": "memory"},
        "train": {"batch_size": 1, "max_train_steps": steps, "max_grad_norm": None, "checkpointing_steps": None,
                  "log_every": 1, "mixed_precision": "bf16" if gpu else "no", **keys},
        "techniques": {kind: {"kind": kind, **({"rank": 4} if kind == "lora" else {})}},
    }
    path = work / f"{variant.replace(' ', '_')}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def measure(path: Path) -> dict:
    """One variant in a fresh ``sdtune train`` process: its record's peak and step time, or the
    one-line refusal."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sdtune", "train", str(path), "--no-progress", "--overwrite"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"refused": (done.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    output = yaml.safe_load(path.read_text())["output_dir"]
    record = json.loads(next(Path(output).glob("*/record.json")).read_text())
    return {"peak_bytes": record["memory"]["peak"]["bytes"], "peak_kind": record["memory"]["peak"]["kind"],
            "s_per_step": record["timing"]["s_per_step"], "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default="/tmp/sdtune-memory-savers")
    parser.add_argument("--only", action="append", help="a variant (repeatable)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    from sdtune.testing.tiny import build_sd15_architecture

    work = Path(args.work)
    if not (work / "sd15-arch" / "model_index.json").exists():
        build_sd15_architecture(work / "sd15-arch", words=["a", "red", "blue", "square", "circle"])
    if not (work / "data" / "metadata.jsonl").exists():
        from sdtune.testing import make_imagefolder

        make_imagefolder(work / "data", count=4, size=args.resolution + 8)
    gpu, rows, started, load_before = torch.cuda.is_available(), [], time.perf_counter(), os.getloadavg()
    for variant in args.only or VARIANTS:
        row = {"variant": variant, **measure(experiment_file(work, variant, args.resolution, args.steps, gpu))}
        rows.append(row)
        shown = row.get("refused") or f"{row['peak_bytes'] / 2**30:.2f} GiB, {row['s_per_step']:.2f} s/step"
        print(f"| {variant} | {shown} |", flush=True)
    commit = git_commit()
    result = {"machine": machine(), "commit": commit, "args": vars(args), "rows": rows,
              "total_s": time.perf_counter() - started, "load_average_1min": [load_before[0], os.getloadavg()[0]]}
    if args.out:
        atomic.write_json(args.out, result, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
