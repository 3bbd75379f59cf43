"""Training throughput per technique, and the loop's overhead beyond the UNet and the optimizer.

For each technique: images/s, s/step and peak memory of sdtune's training loop, then the same
model, technique and batch shapes in a bare loop that does only UNet forward + backward +
optimizer step on fixed tensors. overhead = 1 − bare / loop is the share of step time spent on
everything else (data, latent sampling, noise, loss, clipping, EMA, logging). Target: < 10 %.

    python benchmarks/train_throughput.py [--steps 30] [--model PATH] [--out results.json]

Defaults to the demo base model (exact SD architecture, 64 px) on demo style-domain data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdtune import experiment_from_dict, train_technique
from sdtune.demo import world
from sdtune.demo.run import TECHNIQUES, base_model_path
from sdtune.records import device_description, package_versions
from sdtune.techniques import trainable_named_parameters
from sdtune.training import has_fused_adamw
from sdtune.util.allocator import keep_freed_memory


def bare_seconds_per_step(experiment, name: str, steps: int, warmup: int = 3) -> float:
    """Denoiser forward + backward + AdamW step on fixed tensors of the loop's shapes."""
    cfg = experiment.train_config_for(name)
    model = experiment.family.load(experiment.model)
    technique = experiment.techniques[name].build()
    torch.manual_seed(0)
    technique.prepare(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for module in model.components.values():
        module.to(device)
    model.denoiser.train()
    parameters = list(trainable_named_parameters(model).values())
    if device.type == "cpu" and cfg.keep_freed_cpu_memory:  # the same runtime levers as sdtune's loop
        keep_freed_memory()
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, fused=has_fused_adamw(device) or None)
    side = experiment.data.resolution // model.vae_downsampling
    latents = torch.randn(cfg.batch_size, model.latent_channels, side, side, device=device)
    with torch.no_grad():
        conditioning = model.encode_prompt(["a fixed caption"] * cfg.batch_size)
    resolution = experiment.data.resolution
    geometry = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * cfg.batch_size, device=device)
    conditioning.update(model.image_conditioning(geometry.float()))
    timesteps = torch.randint(0, 1000, (cfg.batch_size,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            started = time.perf_counter()
        for _ in range(cfg.gradient_accumulation_steps):
            prediction = model.predict(latents, timesteps, conditioning)
            torch.nn.functional.mse_loss(prediction, latents).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - started) / steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default=None, help="a diffusers SD folder (default: the demo base model)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--techniques", default=",".join(TECHNIQUES))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdtune-bench-"))
    tune, _ = world.split_combos(0)
    world.write_imagefolder(work / "data", world.sample_scenes(64, 0, "style", combos=tune), args.resolution)
    names = args.techniques.split(",")
    experiment = experiment_from_dict({
        "model": args.model or str(base_model_path()),
        "data": {"source": str(work / "data"), "resolution": args.resolution, "center_crop": True},
        "train": {"batch_size": args.batch_size, "gradient_accumulation_steps": args.accumulation,
                  "max_train_steps": args.steps, "checkpointing_steps": None, "log_every": 1},
        "techniques": {name: TECHNIQUES[name] for name in names},
    })
    results = []
    for name in names:
        record = train_technique(experiment, name, work / "runs", progress=False).record
        bare = bare_seconds_per_step(experiment, name, args.steps)
        loop = record["timing"]["s_per_step"]
        results.append({
            "technique": name, "s_per_step": loop, "images_per_s": record["timing"]["images_per_s"],
            "peak_memory_bytes": record["memory"]["peak"]["bytes"], "memory_kind": record["memory"]["peak"]["kind"],
            "bare_s_per_step": bare, "overhead_share": max(0.0, 1 - bare / loop),
            "trainable_parameters": record["parameters"]["trainable"],
        })
    print(f"device: {device_description(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))['name']}, "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size}×{args.accumulation}, {args.resolution}px")
    print("| technique | img/s | s/step | peak memory | loop overhead |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['technique']} | {r['images_per_s']:.1f} | {r['s_per_step']:.3f} | "
              f"{r['peak_memory_bytes'] / 1e6:.0f} MB ({r['memory_kind']}) | {100 * r['overhead_share']:.1f} % |")
    if args.out:
        Path(args.out).write_text(json.dumps({"versions": package_versions(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
