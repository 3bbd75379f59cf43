"""sdtune against the diffusers example scripts users run instead, on identical work.

Same model folder, data, batch, accumulation, steps, learning rate, schedule, precision and seed;
each run is a fresh process started from the command line, one after the other. Measured per run:

- whole-job wall time: from starting the command to its exit (imports, model load, data, caching,
  every step, saving the weights);
- steady-state s/step: the wall time between the TensorBoard loss events of the second half of the
  steps, divided by their number (both trainers log every step here; with random flips sdtune's
  second half still encodes the (image, flip) pairs the first epoch did not draw: its record's own
  ``steady_s_per_step`` leaves those first-use encodes out);
- peak memory: the process's peak RSS (CPU), read from wait4();
- for sdtune, steady s/step divided by a bare denoiser loop's (forward + backward + AdamW on fixed
  tensors of the same shapes, with sdtune's optimizer kernel and allocator: the limit).

    python benchmarks/vs_reference.py --model sd15-arch --resolution 128 --steps 16 \\
        --batch-size 1 --accumulation 4 --techniques lora,full [--python PYTHON] [--out results.json]

``--python`` runs both trainers with another interpreter (the reference scripts need torchvision;
see ../shared/reference/diffusers-examples/README.md); sdtune must be importable there too.
``--model``: ``sd15-arch`` (SD 1.5's architecture with random weights, built once into --work),
``small`` (a small random SD), or a diffusers folder.
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

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent.parent / "shared" / "reference" / "diffusers-examples"
SETTINGS = {  # the study's two techniques, as the reference scripts run them
    "lora": {"script": "train_text_to_image_lora.py", "learning_rate": 1e-4, "lr_scheduler": "cosine",
             "extra": ["--rank", "4"], "sdtune": {"kind": "lora", "rank": 4, "alpha": 4}},
    "full": {"script": "train_text_to_image.py", "learning_rate": 1e-5, "lr_scheduler": "constant",
             "extra": ["--use_ema"], "sdtune": {"kind": "full", "use_ema": True}},
}


def build_model(kind: str, work: Path) -> Path:
    from sdtune.testing.tiny import TinySizes, build_sd15_architecture, build_tiny_pipeline

    if kind not in ("sd15-arch", "small"):
        return Path(kind)
    folder = work / f"model-{kind}"
    if not (folder / "model_index.json").exists():
        words = ["a", "red", "green", "blue", "circle", "square", "triangle", "large", "small"]
        if kind == "sd15-arch":
            build_sd15_architecture(folder, words)
        else:
            sizes = TinySizes(unet_channels=(32, 64, 64), vae_channels=(32, 64, 64), text_hidden=64, sample_size=32)
            build_tiny_pipeline(folder, words, sizes)
    return folder


def build_data(work: Path, count: int, resolution: int) -> Path:
    """Captioned shapes as an imagefolder with metadata.jsonl (columns image, text): what both read."""
    import numpy as np
    from PIL import Image

    folder = work / f"data-{count}-{resolution}"
    if (folder / "metadata.jsonl").exists():
        return folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
    lines = []
    for i in range(count):
        colour = list(colours)[i % 3]
        pixels = np.full((resolution + 16, resolution + 32, 3), 245, dtype=np.uint8)
        y, x = rng.integers(8, resolution // 2, size=2)
        pixels[y : y + resolution // 3, x : x + resolution // 3] = colours[colour]
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": f"a {colour} square"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_measured(command: list[str], log: Path, env: dict) -> dict:
    """Run a command to completion; its wall time and its peak RSS (the kernel's own accounting)."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[:3]} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}


def steady_from_tensorboard(folder: Path, tag: str) -> float | None:
    """Seconds per step over the second half of the logged steps (event wall times)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = {}
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            times.update({e.step: e.wall_time for e in accumulator.Scalars(tag)})
    steps = sorted(times)
    if len(steps) < 4:
        return None
    half = steps[len(steps) // 2 - 1]
    return (times[steps[-1]] - times[half]) / (steps[-1] - half)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--images", type=int, default=None, help="dataset size (default: half of steps × batch)")
    parser.add_argument("--techniques", default="lora,full")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--python", default=sys.executable, help="interpreter for both trainers")
    parser.add_argument("--work", default="/tmp/sdtune-vs-reference")
    parser.add_argument("--skip-bare", action="store_true", help="do not measure the bare denoiser loop")
    parser.add_argument("--sdtune-only", action="store_true", help="run sdtune alone (no reference, no speed-up)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    samples = args.steps * args.batch_size * args.accumulation
    model = build_model(args.model, work)
    data = build_data(work, args.images or max(samples // 2, 1), args.resolution)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    rows = []
    for name in args.techniques.split(","):
        setting = SETTINGS[name]
        out = work / f"out-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        reference = [
            args.python, str(REFERENCE / setting["script"]), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--resolution", str(args.resolution), "--center_crop", "--random_flip",
            "--train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", str(args.accumulation),
            "--max_train_steps", str(args.steps), "--learning_rate", str(setting["learning_rate"]),
            "--lr_scheduler", setting["lr_scheduler"], "--seed", "0", "--dataloader_num_workers", "0",
            "--mixed_precision", args.mixed_precision, "--checkpointing_steps", "100000",
            "--output_dir", str(out / "reference"), *setting["extra"],
        ]
        experiment = {
            "name": "vs-reference", "model": str(model),
            "data": {"source": str(data), "resolution": args.resolution, "center_crop": True, "random_flip": True},
            "train": {"batch_size": args.batch_size, "gradient_accumulation_steps": args.accumulation,
                      "max_train_steps": args.steps, "learning_rate": setting["learning_rate"],
                      "lr_scheduler": setting["lr_scheduler"], "mixed_precision": args.mixed_precision, "seed": 0,
                      "checkpointing_steps": None, "log_every": 1},
            "techniques": {name: setting["sdtune"]},
        }
        (out).mkdir(parents=True)
        (out / "experiment.yaml").write_text(yaml.safe_dump(experiment))
        ours = [args.python, "-m", "sdtune.cli", "train", str(out / "experiment.yaml"), "--output",
                str(out / "sdtune"), "--no-progress"]
        ref = {"wall_s": float("nan"), "steady_s_per_step": None, "peak_rss_bytes": float("nan")}
        if not args.sdtune_only:
            print(f"{name}: reference …", flush=True)
            ref = run_measured(reference, out / "reference.log", env)
            ref["steady_s_per_step"] = steady_from_tensorboard(out / "reference", "train_loss")
        print(f"{name}: sdtune …", flush=True)
        sd = run_measured(ours, out / "sdtune.log", env)
        record = json.loads((out / "sdtune" / name / "record.json").read_text())
        sd["steady_s_per_step"] = steady_from_tensorboard(out / "sdtune" / name / "logs", "train/loss")
        sd["record_timing"] = record["timing"]
        row = {"technique": name, "reference": ref, "sdtune": sd,
               "wall_speedup": ref["wall_s"] / sd["wall_s"],
               "steady_speedup": (ref["steady_s_per_step"] or 0) / (sd["steady_s_per_step"] or float("inf"))}
        if not args.skip_bare:
            sys.path.insert(0, str(HERE))
            from train_throughput import bare_seconds_per_step

            from sdtune import experiment_from_dict

            bare = bare_seconds_per_step(experiment_from_dict(experiment), name, max(args.steps // 2, 2), warmup=2)
            row["bare_s_per_step"] = bare
            row["sdtune_over_bare"] = sd["steady_s_per_step"] / bare if sd["steady_s_per_step"] else None
        rows.append(row)
        print(json.dumps(row, indent=1, default=str), flush=True)
    print(f"\nmodel {args.model}, {args.resolution}px, batch {args.batch_size}×{args.accumulation}, "
          f"{args.steps} steps, {len(list(data.glob('*.png')))} images, precision {args.mixed_precision}")
    print("| technique | trainer | whole job (s) | steady s/step | peak RSS | speed-up (job / steady) | ÷ bare loop |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for trainer in ("reference", "sdtune"):
            r = row[trainer]
            speed = f"{row['wall_speedup']:.2f}× / {row['steady_speedup']:.2f}×" if trainer == "sdtune" else "1"
            bare = f"{row['sdtune_over_bare']:.2f}" if trainer == "sdtune" and row.get("sdtune_over_bare") else ""
            print(f"| {row['technique']} | {trainer} | {r['wall_s']:.1f} | {r['steady_s_per_step'] or float('nan'):.2f} | "
                  f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {speed} | {bare} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
