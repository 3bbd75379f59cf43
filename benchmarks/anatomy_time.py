"""How long the anatomy of a weight change takes on Stable Diffusion 1.5's architecture (the 860 M-
parameter UNet; random weights, `sdtune.testing.tiny.build_sd15_architecture`), for full fine-tuning
and for LoRA (rank 4 on the attention projections, the study's placement) — the work every finished
run does in `sdtune.training.finish` and `sdtune anatomy` does for a run folder.

- full: W_after = W_before + a dense update of 1e-3 of each tensor's standard deviation per element
  (full fine-tuning's ΔW is full rank: every matrix goes through the svd_lowrank path on its larger
  layers); the base model is reloaded from disk, as at the end of a full run (included in the time);
- lora: peft's LoRA injected as sdtune does, its B matrices set to N(0, 1e-3) (they start at zero).

Random weights are the intruder test's worst case: their spectra have no gaps (Marchenko–Pastur), so
a perturbed matrix's top singular vectors seldom match one of the base's, and larger layers fall back
to the exact basis (`sdtune.anatomy.maths.intruder_dimensions`). Each variant runs in its own process.

    python benchmarks/anatomy_time.py --work /tmp/sd15 [--only full|lora] [--out benchmarks/results/anatomy_time-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def measure(model: Path, technique: str) -> dict:
    import torch

    from sdtune.anatomy import base_lookup, model_anatomy
    from sdtune.config import ModelConfig
    from sdtune.models import FAMILIES

    family = FAMILIES.get("sd1")
    config = ModelConfig(path=str(model))
    trained = family.load(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if technique == "full":
            for parameter in trained.denoiser.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3 * parameter.std())
        else:
            from sdtune.techniques import TECHNIQUES

            TECHNIQUES.get("lora")({"peft": {"r": 4, "lora_alpha": 4}}).prepare(trained)
            for name, parameter in trained.denoiser.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-3)
        started, cpu = time.perf_counter(), time.process_time()
        anatomy = model_anatomy(
            {"unet": trained.denoiser}, base_lookup(lambda: family.load(config)), family, f"benchmark ({technique})",
            compare=lambda layer: technique == "full", progress=True,
        )
    total = anatomy.total
    return {
        "technique": technique, "seconds": time.perf_counter() - started, "anatomy_time_s": anatomy.time_s,
        "cpu_seconds": time.process_time() - cpu,  # this process's CPU time (the machine may be shared)
        "matrices": total["changed_layers"], "lowrank_layers": sum(not layer["rank_exact"] for layer in anatomy.layers),
        "intruder_tests_not_exact": sum(not layer["intruders_exact"] for layer in anatomy.layers),
        "intruders": total["intruders"], "effective_rank_median": total["effective_rank_median"],
        "numerical_rank_max": total["numerical_rank_max"], "load_average_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="where SD 1.5's architecture is built (once)")
    parser.add_argument("--only", choices=["full", "lora"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = args.work / "sd15-arch"
    if args.child:
        print(json.dumps(measure(model, args.only)))
        return
    if not (model / "model_index.json").exists():
        from sdtune.testing.tiny import build_sd15_architecture

        build_sd15_architecture(model, ["a", "red", "circle"])
    results = []
    for technique in [args.only] if args.only else ["lora", "full"]:
        load = os.getloadavg()
        child = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--only", technique, "--child"],
                               capture_output=True, text=True, check=True)
        results.append({**json.loads(child.stdout.strip().splitlines()[-1]), "load_average_before": load})
        print(json.dumps(results[-1]), flush=True)
    summary = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}, "results": results}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
