"""The speed levers of sdtune's training step, each measured on its own, each in a fresh process.

- ``adamw``: one AdamW step over the UNet's weights: torch's default (on the CPU a per-tensor loop),
  multi-tensor (``foreach``) and ``fused``;
- ``ema``: one EMA update over the UNet's weights: diffusers' ``EMAModel`` (plain and ``foreach``)
  and sdtune's one-``lerp_``-per-tensor (``sdtune.training.ema.LerpEMA``);
- ``step``: UNet forward + backward of one image for full fine-tuning and LoRA (rank 4), with the
  C library's default malloc or sdtune's (``sdtune.util.allocator``), contiguous or channels_last.

Each figure is the median of the timed repeats after a warm-up (first use: page faults, lazy state).

    python benchmarks/levers.py --model sd15-arch --resolution 128 [--out levers.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARMUP, REPEATS = 2, 4


def _unet(model: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model, subfolder="unet")


def _timed(function) -> list[float]:
    seconds = []
    for _ in range(WARMUP + REPEATS):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return seconds[WARMUP:]


def measure_adamw(model: Path, variant: str) -> list[float]:
    import torch

    parameters = list(_unet(model).parameters())
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter) * 1e-3
    kernel = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[variant]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, **kernel)
    return _timed(optimizer.step)


def measure_ema(model: Path, variant: str) -> list[float]:
    from diffusers.training_utils import EMAModel

    from sdtune.training.ema import LerpEMA

    parameters = list(_unet(model).parameters())
    ema = LerpEMA(parameters, foreach=False) if variant == "lerp" else EMAModel(parameters, foreach=variant == "foreach")
    return _timed(lambda: ema.step(parameters))


def measure_step(model: Path, variant: str, resolution: int) -> list[float]:
    import torch

    technique, malloc, layout = variant.split("/")
    if malloc == "kept":
        from sdtune.util.allocator import keep_freed_memory

        assert keep_freed_memory() == "kept"
    torch.manual_seed(0)
    unet = _unet(model)
    if technique == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    unet.train()
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    unet.to(memory_format=memory_format)
    side = resolution // 8
    latents = torch.randn(1, unet.config.in_channels, side, side).contiguous(memory_format=memory_format)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    timestep = torch.tensor([500])

    def step() -> None:
        prediction = unet(latents, timestep, context).sample
        torch.nn.functional.mse_loss(prediction, torch.zeros_like(prediction)).backward()

    return _timed(step)


VARIANTS = {
    "adamw": ["default", "foreach", "fused"],
    "ema": ["plain", "foreach", "lerp"],
    "step": [f"{t}/{m}/{lay}" for t in ("full", "lora") for m in ("default", "kept") for lay in ("contiguous", "channels_last")],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch", help="sd15-arch, small, or a diffusers folder")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--work", default="/tmp/sdtune-vs-reference")
    parser.add_argument("--only", default=None, help="one lever: adamw, ema or step")
    parser.add_argument("--child", nargs=2, metavar=("LEVER", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from vs_reference import build_model

    model = build_model(args.model, Path(args.work))
    if args.child:  # one measurement, in this fresh process
        lever, variant = args.child
        if lever == "step":
            seconds = measure_step(model, variant, args.resolution)
        else:
            seconds = {"adamw": measure_adamw, "ema": measure_ema}[lever](model, variant)
        print(json.dumps(seconds))
        return 0
    rows = []
    for lever, variants in VARIANTS.items():
        if args.only and lever != args.only:
            continue
        for variant in variants:
            command = [sys.executable, __file__, "--model", args.model, "--resolution", str(args.resolution),
                       "--work", args.work, "--child", lever, variant]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            seconds = json.loads(output.strip().splitlines()[-1])
            rows.append({"lever": lever, "variant": variant, "seconds": seconds, "median_s": statistics.median(seconds)})
            print(f"| {lever} | {variant} | {rows[-1]['median_s']:.3f} | {' '.join(f'{s:.2f}' for s in seconds)} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
