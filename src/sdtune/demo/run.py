"""``sdtune demo``: the study in miniature, on a laptop CPU, judged against exact ground truth.

Fine-tunes the shipped base model (flat shapes on a light background) on the style domain (the
same objects with a dark outline on a pastel background, captions that never name the style) with
every technique, then compares them with ``sdtune compare``: the judge measures prompt accuracy,
the style split (the study's realistic / semi-cartoon / cartoon table) and how well each technique
still follows held-out prompts it was never fine-tuned on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sdtune import UserError
from sdtune.demo import world
from sdtune.demo.metrics import JUDGE_METRICS, PLUGIN
from sdtune.util import atomic
from sdtune.util.paths import check_writable_folder

ASSET = "demo-base"


class DemoModelMissing(UserError, FileNotFoundError):
    """The shipped demo base model is not where the package expects it."""


@dataclass(frozen=True)
class DemoSettings:
    """How big the demo is. ``quick`` is for tests: a few steps, few prompts."""

    num_images: int = 240  # style-domain fine-tuning images
    max_train_steps: int = 100  # the study's 100 steps of batch 16
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    in_domain_prompts: int = 6
    held_out_prompts: int = 4
    seeds_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 4.0  # the base model samples best at 3-5
    validation_images: int = 24  # held-out style images (a separate set: the fine-tuning set is unchanged)
    every_steps: int | None = 50  # quality and validation loss over training (at 50, and at the end)
    # images at step 50: one seed per prompt (60 images in all, not 240: the intermediate point of
    # the curves; the finished models keep every seed). Measured: docs/benchmarks.md, the demo's wall time
    seeds_during_training: int | None = 1
    techniques: tuple[str, ...] = ("full", "lora", "dora", "loha", "lokr", "cross-attention")
    # torch threads of every demo process (None: torch's default, one per core). The demo model is
    # too small to gain from a second thread (measured on 2 idle cores: 0.36 s/image either way; a
    # LoRA step 0.364 s on 1 thread, 0.33 on 2), and on a busy machine two threads waiting for each
    # other at every operation made a step 15× slower (17.2 s against 1.17 on 1 thread, load 12).
    torch_threads: int | None = 1


QUICK = DemoSettings(
    num_images=16, max_train_steps=2, batch_size=2, gradient_accumulation_steps=1, in_domain_prompts=2,
    held_out_prompts=1, seeds_per_prompt=1, num_inference_steps=3, techniques=("full", "lora"),
    validation_images=4, every_steps=1,
)

# The study's two techniques with its schedules (full: constant + EMA; LoRA: cosine), plus the other
# plug-ins. Learning rates are 5× SD's usual ones (1e-5 full, 1e-4 LoRA; LyCORIS' higher rates for
# LoHa/LoKr) because the demo model is ~1000× smaller; every technique keeps its relative rate.
TECHNIQUES: dict[str, dict[str, Any]] = {
    "full": {"kind": "full", "use_ema": True, "ema_decay": 0.99, "lr_scheduler": "constant", "learning_rate": 5.0e-5},
    "lora": {"kind": "lora", "rank": 4, "alpha": 4, "lr_scheduler": "cosine", "learning_rate": 5.0e-4},
    "dora": {"kind": "dora", "rank": 4, "alpha": 4, "lr_scheduler": "cosine", "learning_rate": 5.0e-4},
    "loha": {"kind": "loha", "rank": 4, "alpha": 4, "lr_scheduler": "cosine", "learning_rate": 1.0e-3},
    "lokr": {"kind": "lokr", "rank": 4, "alpha": 4, "lr_scheduler": "cosine", "learning_rate": 2.0e-3},
    "cross-attention": {"kind": "partial", "preset": "cross-attention", "lr_scheduler": "constant", "learning_rate": 5.0e-5},
}


def base_model_path() -> Path:
    """The demo base model shipped inside the package."""
    path = Path(str(resources.files("sdtune") / "assets" / ASSET))
    if not (path / "model_index.json").exists():
        raise DemoModelMissing(
            f"the demo base model is missing at {path}; rebuild it with `sdtune demo pretrain --out {path}`"
        )
    return path


def demo_experiment(output_dir: Path, settings: DemoSettings, seed: int = 0) -> Path:
    """Write the demo's data and experiment file into ``output_dir``; return the file's path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tune, held_out = world.split_combos(seed)
    data_dir = output_dir / "data"
    if not (data_dir / "metadata.jsonl").exists():
        world.write_imagefolder(data_dir, world.sample_scenes(settings.num_images, seed + 7, "style", combos=tune))
    validation_dir = output_dir / "validation"
    if not (validation_dir / "metadata.jsonl").exists():  # same combos, other scenes: never trained on
        scenes = world.sample_scenes(settings.validation_images, seed + 11, "style", combos=tune)
        world.write_imagefolder(validation_dir, scenes)
    # prompts worded like the captions ("a large red circle"), alternating sizes
    sizes = list(world.SIZES)
    in_domain = [
        f"a {sizes[i % 2]} {colour} {shape}" for i, (shape, colour) in enumerate(tune[: settings.in_domain_prompts])
    ]
    held = [f"a {sizes[i % 2]} {colour} {shape}" for i, (shape, colour) in enumerate(held_out[: settings.held_out_prompts])]
    experiment = {
        "name": "demo",
        "model": str(base_model_path()),
        "data": {"source": "data", "resolution": 64, "center_crop": True, "random_flip": True, "validation": "validation"},
        "train": {
            "batch_size": settings.batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "max_train_steps": settings.max_train_steps,
            "seed": seed,
            "checkpointing_steps": None,
        },
        "techniques": {name: TECHNIQUES[name] for name in settings.techniques},
        "evaluation": {
            "prompts": in_domain,
            "out_of_domain_prompts": held,  # held-out combinations: never in the fine-tuning set
            "seeds_per_prompt": settings.seeds_per_prompt,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "scheduler": "DDIMScheduler",
            "metrics": JUDGE_METRICS,
            "metric_plugins": [PLUGIN],  # the judge metrics register themselves
            "every_steps": settings.every_steps,
            "seeds_per_prompt_during_training": settings.seeds_during_training,
        },
        "output_dir": ".",
    }
    path = output_dir / "experiment.yaml"
    header = "# Written by `sdtune demo`; rerun with `sdtune compare experiment.yaml`.\n"
    atomic.write_text(path, header + yaml.safe_dump(experiment, sort_keys=False))
    return path


def run_demo(output_dir: str | Path = "demo-output", quick: bool = False, progress: bool = True) -> Path:
    """Build the demo experiment and run the whole comparison; returns the report's path."""
    import sdtune

    settings = QUICK if quick else DemoSettings()
    check_writable_folder(output_dir, "--output")  # (before the demo's data is written there)
    path = demo_experiment(Path(output_dir), settings)
    with torch_threads(settings.torch_threads):
        return sdtune.compare(sdtune.load_experiment(path), progress=progress)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Inside the block, this process and the training processes it starts (they read
    ``OMP_NUM_THREADS``) use ``count`` torch threads; both are restored afterwards. Nothing changes
    when ``count`` is None or the user set ``OMP_NUM_THREADS``."""
    import torch

    if count is None or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    previous = torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]
        torch.set_num_threads(previous)
