"""LoRA vs QLoRA (nf4) vs LoRA on an int8 base, on the demo's data and base model, on this machine.

    python benchmarks/lora_vs_qlora.py [--output DIR] [--out benchmarks/results/lora_vs_qlora-cpu.json]

The demo's fine-tuning (240 style images, 100 steps of batch 16, LoRA rank 4, the same seed, data
order and noise for all three) with the UNet's linear layers in fp32, NF4 or int8; then, from the
records and images of `sdtune compare`:

- quality: the exact judge's prompt accuracy, held-out accuracy and full-style share (40 images each);
- drift: mean |tuned − base| of the held-out prompts' images (same prompt and seed, pixels in [0, 1]),
  and the same for the quantised base with no adapter (what quantisation alone moves);
- memory: the UNet's weight bytes as trained (exact, parameters + quantisation statistics) and the
  training process's peak RSS (its whole life: the model is loaded in fp32 before it is quantised);
- speed: the recorded seconds per step (wall), and the CPU time of one training step of the UNet
  with its LoRA (forward + backward at batch 16, 64 px, median of 5 after one warm-up), which a
  busy machine disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.util import atomic

TECHNIQUES = ("lora", "qlora", "lora-int8")
QUANTIZATION = {"lora": None, "qlora": "nf4", "lora-int8": "int8"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="the comparison's folder (default: a temp folder)")
    parser.add_argument("--out", default="benchmarks/results/lora_vs_qlora-cpu.json")
    parser.add_argument("--quick", action="store_true", help="the demo's quick settings (a smoke test of this script)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the demo's 100)")
    parser.add_argument("--accumulation", type=int, help="micro-batches of 4 per step (default: the demo's 4)")
    parser.add_argument("--seeds-per-prompt", type=int, help="evaluation seeds (default: the demo's 4)")
    args = parser.parse_args()
    import sdtune
    from sdtune.demo.run import QUICK, DemoSettings, demo_experiment
    from sdtune.records import device_description, git_commit, package_versions

    output = Path(args.output or tempfile.mkdtemp(prefix="sdtune-qlora-")) / "lora-vs-qlora"
    settings = dataclasses.replace(QUICK if args.quick else DemoSettings(), techniques=TECHNIQUES, every_steps=None)
    given = {"max_train_steps": args.steps, "gradient_accumulation_steps": args.accumulation,
             "seeds_per_prompt": args.seeds_per_prompt}
    settings = dataclasses.replace(settings, **{key: value for key, value in given.items() if value is not None})
    experiment = sdtune.load_experiment(demo_experiment(output, settings))
    started = time.perf_counter()
    report = sdtune.compare(experiment, progress=False)
    wall = time.perf_counter() - started
    rows = _rows(report.parent)
    base_drift = _quantized_base_drift(experiment, report.parent)
    step_cpu = {name: _step_cpu_seconds(experiment, QUANTIZATION[name], settings.batch_size * settings.gradient_accumulation_steps) for name in TECHNIQUES}
    for row in rows:
        row["step_cpu_s"] = step_cpu[row["technique"]]
    result = {
        "machine": device_description(torch.device("cpu")), "commit": git_commit(),
        "versions": package_versions(),
        "settings": dataclasses.asdict(settings), "compare_wall_s": wall, "rows": rows, "quantized_base_drift": base_drift, "report": str(report),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out, result, default=str)
    print(_table(rows, base_drift))
    print(f"compare: {wall:.0f} s wall; report: {report}; numbers: {args.out}")
    return 0


def _rows(root: Path) -> list[dict]:
    from sdtune.records import load_records

    trains, evals = load_records(root)
    by_label = {record.label: record for record in sorted(evals, key=lambda r: r.step or 0)}  # the final ones
    base = by_label["base"]
    rows = []
    for train in sorted(trains, key=lambda r: TECHNIQUES.index(r.technique["name"])):
        name = train.technique["name"]
        tuned = by_label[name]
        unet = ((train.quantization or {}).get("components") or {}).get("unet")
        rows.append({
            "technique": name,
            "quantization": QUANTIZATION[name],
            "prompt_accuracy": tuned.metrics["judge_prompt_accuracy"]["value"],
            "heldout_accuracy": tuned.metrics["judge_heldout_accuracy"]["value"],
            "full_style": tuned.metrics["judge_full_style"]["value"],
            "pixel_drift": _pixel_drift(root, base, tuned),
            "unet_weight_bytes": unet["weight_bytes"] if unet else _unet_bytes(train),
            "quantized_share": unet["quantized_share"] if unet else 0.0,
            "peak_rss_bytes": train.memory["peak"]["bytes"],
            "s_per_step": train.timing["s_per_step"],
            "final_loss": train.loss_history[-1]["loss"],
            "image_latency_s": tuned.generation["latency_s_mean"],
        })
    return rows


def _unet_bytes(train) -> int:
    """A full-precision UNet's weight bytes: its parameter count × 4 (fp32) − the adapter's."""
    return (train.parameters["components"]["unet"] - train.parameters["trainable"]) * 4


def _pixel_drift(root: Path, base, tuned) -> float:
    """Mean |tuned − base| over the held-out prompts' images (same prompt and seed), pixels in [0, 1]."""
    pairs = [(b["path"], t["path"]) for b, t in zip(base.images, tuned.images) if not t["in_domain"]]
    return float(np.mean([np.abs(_pixels(root / t) - _pixels(root / b)).mean() for b, t in pairs]))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def _quantized_base_drift(experiment, root: Path) -> dict[str, dict[str, float]]:
    """The base model with its UNet quantised and no adapter, against the full-precision base's images:
    what quantisation alone moves (held-out prompts; the judge's accuracy on every prompt)."""
    from sdtune.config import QuantizeConfig
    from sdtune.demo.judge import judge_many
    from sdtune.demo.metrics import prompt_targets
    from sdtune.generation import load_base_pipeline
    from sdtune.models.sampling import generate_images, set_scheduler
    from sdtune.records import load_records

    base = next(r for r in load_records(root)[1] if r.label == "base")
    settings, plan = experiment.evaluation, experiment.plan
    result = {}
    for kind in ("nf4", "int8"):
        model = dataclasses.replace(experiment.model, quantize=QuantizeConfig(denoiser=kind))
        pipe = load_base_pipeline(model, device=torch.device("cpu"))
        set_scheduler(pipe, settings.scheduler)
        images = generate_images(
            pipe, [], [], settings.num_inference_steps, settings.guidance_scale, experiment.eval_resolution,
            progress=False, pairs=plan.pairs(),
        ).images
        judged = judge_many(images)
        targets = [prompt_targets(p) for p, _ in plan.pairs()]
        drift = [
            np.abs(np.asarray(image, dtype=np.float32) / 255.0 - _pixels(root / entry["path"])).mean()
            for image, entry in zip(images, base.images) if not entry["in_domain"]
        ]
        result[kind] = {
            "pixel_drift": float(np.mean(drift)),
            "prompt_accuracy": float(np.mean([j.colour == c and j.shape == s for j, (c, s) in zip(judged, targets)])),
        }
    return result


def _step_cpu_seconds(experiment, kind: str | None, batch: int, repeats: int = 5) -> float:
    """CPU time (process_time: every thread's) of one training step of the UNet with a rank-4 LoRA."""
    from peft import LoraConfig, inject_adapter_in_model

    from sdtune.config import QuantizeConfig

    config = dataclasses.replace(experiment.model, quantize=QuantizeConfig(denoiser=kind))
    model = experiment.family.load(config)
    unet = model.denoiser.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=model.adapter_targets["unet"]), unet)
    unet.train()
    generator = torch.Generator().manual_seed(0)
    side = experiment.data.resolution // model.vae_downsampling
    latents = torch.randn(batch, model.latent_channels, side, side, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    text = torch.randn(batch, model.tokenizers["tokenizer"].model_max_length, unet.config.cross_attention_dim, generator=generator)
    seconds = []
    for _ in range(repeats + 1):
        started = time.process_time()
        unet(latents, timesteps, text).sample.pow(2).mean().backward()
        seconds.append(time.process_time() - started)
    return statistics.median(seconds[1:])


def _table(rows: list[dict], base_drift: dict) -> str:
    lines = [
        "| technique | UNet linear layers | prompt acc. | held-out acc. | full style | pixel drift | UNet weights | peak RSS | s/step (wall) | step CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['technique']} | {r['quantization'] or 'fp32'} ({r['quantized_share']:.0%} of weights) "
            f"| {r['prompt_accuracy']:.0%} | {r['heldout_accuracy']:.0%} | {r['full_style']:.0%} | {r['pixel_drift']:.4f} "
            f"| {r['unet_weight_bytes'] / 1e6:.2f} MB | {r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['s_per_step']:.2f} "
            f"| {r['step_cpu_s']:.2f} |"
        )
    for kind, values in base_drift.items():
        lines.append(f"\nbase with a {kind} UNet, no adapter: prompt accuracy {values['prompt_accuracy']:.0%}, "
                     f"pixel drift {values['pixel_drift']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
