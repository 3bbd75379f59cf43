"""Train LoRA and full fine-tuning with EMA on the demo base model (6 steps, the demo's data) with the
sdtune that is importable, and compare the written weights with another checkout's, tensor by tensor.

    python benchmarks/same_weights.py OUT                      # this checkout → OUT/work
    PYTHONPATH=/other/checkout/src python benchmarks/same_weights.py OUT2
    python benchmarks/same_weights.py --compare OUT OUT2       # bit-identical?

Used to show that a restructuring changed no arithmetic (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

FILES = [
    "lora/pytorch_lora_weights.safetensors", "lora/unet_adapter.safetensors", "lora/pytorch_lora_weights_kohya.safetensors",
    "full/unet/diffusion_pytorch_model.safetensors", "full/text_encoder/model.safetensors",
]


def train(out: Path) -> None:
    import yaml

    import sdtune
    from sdtune.demo.run import DemoSettings, demo_experiment

    settings = DemoSettings(num_images=32, max_train_steps=6, batch_size=2, gradient_accumulation_steps=2,
                            techniques=("full", "lora"), every_steps=None, validation_images=4)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    path = demo_experiment(work, settings)
    raw = yaml.safe_load(path.read_text())
    raw["data"].pop("validation")
    raw.pop("evaluation")
    path.write_text(yaml.safe_dump(raw))
    experiment = sdtune.load_experiment(path)
    for name in ("full", "lora"):
        sdtune.train_technique(experiment, name, work, progress=False)
    print(f"trained with {sdtune.__file__} into {work}")


def compare(first: Path, second: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    same = True
    for relative in FILES:
        a, b = load_file(first / "work" / relative), load_file(second / "work" / relative)
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        worst = max(((a[k].float() - b[k].float()).abs().max().item() for k in a if k in b), default=0.0)
        print(f"{relative}: {len(a)} tensors, bit-identical: {equal}, max |difference|: {worst:.3g}")
        same &= equal
    for name in ("full", "lora"):
        losses = [[h["loss"] for h in json.loads((root / "work" / name / "record.json").read_text())["loss_history"]]
                  for root in (first, second)]
        print(f"{name}: loss histories equal: {losses[0] == losses[1]}")
        same &= losses[0] == losses[1]
    return same


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path, metavar="OTHER")
    args = parser.parse_args()
    raise SystemExit(0 if compare(args.out, args.compare) else 1) if args.compare else train(args.out)
