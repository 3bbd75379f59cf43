"""``sdtune demo --subject``: subject-driven fine-tuning (DreamBooth, textual inversion) in miniature.

The base model knows circles, squares and triangles. The subject is an object it has never seen —
a red plus (``world.SUBJECT_SHAPES``), named by a made-up word — shown in a handful of renders in
the world's style, all captioned ``"a zorp"``. Every technique learns it from the same images,
order and seeds, and the judge reads each generated image exactly: does ``"a zorp"`` draw the plus
(``judge_subject_drawn``), and do prompts for the other shapes still draw them
(``judge_others_kept``, where a circle drawn as a plus counts as wrong)?

The techniques are the DreamBench baselines: textual inversion (Gal et al. 2022: the word is a new
token whose embedding alone trains), DreamBooth-LoRA and full DreamBooth (Ruiz et al. 2023: the
word is a rare identifier, and prior preservation keeps the class from drifting).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdtune.demo import world
from sdtune.demo.metrics import PLUGIN, SUBJECT_METRICS
from sdtune.demo.run import base_model_path, torch_threads
from sdtune.util import atomic
from sdtune.util.paths import check_writable_folder

# The made-up word. Textual inversion adds it as a new token; the other techniques read it as
# DreamBooth's rare identifier: here four single-character tokens the base model never saw in a
# caption (its captions are whole vocabulary words). "a zorp" is 7 tokens with start/end: it fits
# the demo text encoder's 8.
SUBJECT_WORD = "zorp"
# DreamBooth's class prompt: what prior preservation keeps from drifting. It must read differently from
# the identifier: "a shape" would be as unseen as "a zorp" (single characters again), and with it the
# prior pulled "a zorp" back to the red circles "a shape" draws, while the plus leaked into the
# circle prompts (300 steps: 0/8 pluses, 5/8 circles drawn as pluses). The world has no class noun, so
# the class is the object the plus is nearest to and would overwrite: a red circle.
CLASS_PROMPT = "a red circle"
OTHER_PROMPTS = ("a large blue circle", "a small green square", "a large yellow triangle")


@dataclass(frozen=True)
class SubjectSettings:
    """How big the subject round is. ``quick`` is for tests: a few steps, few images."""

    num_instance_images: int = 6  # DreamBooth's "3-5 images" and diffusers' 5-photo dog, about
    max_train_steps: int = 300
    batch_size: int = 4
    num_class_images: int = 24
    seeds_per_prompt: int = 8
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    techniques: tuple[str, ...] = ("textual-inversion", "lora-dreambooth", "full-dreambooth")


QUICK = SubjectSettings(
    max_train_steps=2, batch_size=2, num_class_images=2, seeds_per_prompt=1, num_inference_steps=3,
    techniques=("textual-inversion", "lora-dreambooth"),
)

# Learning rates are high for the same reason as the main demo's (a ~1000× smaller model), and
# higher again than its style round's: a new shape from 6 images in 300 steps. Checked before this
# round was built (full + prior preservation, 300 steps, judged on "a zorp" × 8 seeds): 3e-4 drew 2
# pluses in 8, 1e-3 drew 5 (without prior preservation, 3e-4 and 150 steps drew them, but also turned
# most circles into pluses). LoRA takes 10× full's rate (diffusers' DreamBooth: 1e-4 vs 5e-6, 20×);
# textual inversion's one embedding row takes a high rate too, as in its sources (5e-3 in diffusers'
# script with its batch scaling).
TECHNIQUES: dict[str, dict[str, Any]] = {
    "textual-inversion": {
        "kind": "textual-inversion", "placeholder_token": SUBJECT_WORD, "initializer_token": "circle",
        "learning_rate": 1.0e-2,
    },
    "lora-dreambooth": {
        "kind": "lora", "rank": 8, "alpha": 8, "learning_rate": 1.0e-2, "prior_preservation": True,
    },
    "full-dreambooth": {"kind": "full", "learning_rate": 1.0e-3, "prior_preservation": True},
}


def subject_experiment(output_dir: Path, settings: SubjectSettings, seed: int = 0) -> Path:
    """Write the subject round's instance images and experiment file into ``output_dir``; return the file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir = output_dir / "data"
    if not (data_dir / "metadata.jsonl").exists():
        combo = [(world.SUBJECT_SHAPES[0], world.SUBJECT_COLOUR)]
        world.write_imagefolder(data_dir, world.sample_scenes(settings.num_instance_images, seed + 13, "base", combo))
    experiment = {
        "name": "demo-subject",
        "model": str(base_model_path()),
        "data": {
            "source": "data", "resolution": 64, "center_crop": True, "random_flip": True,
            "instance_prompt": f"a {SUBJECT_WORD}",  # the renders' own captions name the plus
        },
        "train": {
            "batch_size": settings.batch_size,
            "max_train_steps": settings.max_train_steps,
            "lr_scheduler": "constant",
            "seed": seed,
            "checkpointing_steps": None,
            "prior_loss_weight": 1.0,  # the paper's λ
        },
        "dreambooth": {
            "class_prompt": CLASS_PROMPT,
            "num_class_images": settings.num_class_images,
            "class_inference_steps": settings.num_inference_steps,
            "class_guidance_scale": settings.guidance_scale,
        },
        "techniques": {name: TECHNIQUES[name] for name in settings.techniques},
        "evaluation": {
            "prompts": [f"a {SUBJECT_WORD}"],
            "out_of_domain_prompts": list(OTHER_PROMPTS),  # the base world's shapes: still drawn?
            "seeds_per_prompt": settings.seeds_per_prompt,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "scheduler": "DDIMScheduler",
            "metrics": SUBJECT_METRICS,
            "metric_plugins": [PLUGIN],  # the judge metrics register themselves
        },
        "output_dir": ".",
    }
    path = output_dir / "experiment.yaml"
    header = "# Written by `sdtune demo --subject`; rerun with `sdtune compare experiment.yaml`.\n"
    atomic.write_text(path, header + yaml.safe_dump(experiment, sort_keys=False))
    return path


def run_subject(output_dir: str | Path = "demo-subject-output", quick: bool = False, progress: bool = True) -> Path:
    """Build the subject round's experiment and run the whole comparison; returns the report's path."""
    import sdtune

    check_writable_folder(output_dir, "--output")  # (before the round's images are written there)
    path = subject_experiment(Path(output_dir), QUICK if quick else SubjectSettings())
    with torch_threads(1):  # as the demo (DemoSettings.torch_threads): a tiny model, a busy machine
        return sdtune.compare(sdtune.load_experiment(path), progress=progress)
