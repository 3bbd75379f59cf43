"""The demo's subject round: the new object (a plus), the judge's rule for it, its metrics, the round."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdtune.demo import world
from sdtune.demo.judge import judge, subject_shape
from sdtune.demo.metrics import others_kept, subject_drawn
from sdtune.metrics.registry import MetricContext

N_PER_SHAPE = 60  # per shape and domain


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur (radius 1) and add Gaussian pixel noise (sigma 8), like a small model's samples."""
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
    arr = arr + rng.normal(0.0, 8.0, arr.shape)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def rendered():
    """Every shape, the plus included, in every colour, size and domain: scenes and renders."""
    combos = [(shape, colour) for shape in world.SHAPES + world.SUBJECT_SHAPES for colour in world.COLOURS]
    scenes = []
    for domain in world.DOMAINS:
        scenes += world.sample_scenes(N_PER_SHAPE * len(combos) // len(world.COLOURS), 21, domain, combos)
    return scenes, [world.render(scene) for scene in scenes]


def test_plus_is_a_scene_shape_but_not_in_the_base_world():
    plus = world.render(world.Scene("plus", "red", 0.5, 0.5, 0.5))
    assert plus.size == (64, 64)
    pixels = np.asarray(plus)
    assert tuple(pixels[32, 32]) == world.COLOURS["red"]  # centre: where the arms cross
    assert tuple(pixels[19, 19]) == world.BASE_BACKGROUND  # a notch: empty between two arms
    assert "plus" not in world.VOCABULARY and all(shape != "plus" for shape, _ in world.all_combos())
    with pytest.raises(ValueError):
        world.Scene("hexagon", "red", 0.5, 0.5, 0.5)


def test_subject_rule_agrees_with_ground_truth(rendered):
    scenes, images = rendered
    judgements = [judge(image) for image in images]
    for shape in world.SHAPES + world.SUBJECT_SHAPES:
        rows = [i for i, scene in enumerate(scenes) if scene.shape == shape]
        correct = sum(subject_shape(judgements[i]) == shape for i in rows) / len(rows)
        assert correct >= 0.98, (shape, correct)
    # the default demo's own rule is unchanged: the base shapes keep their class
    base = [i for i, scene in enumerate(scenes) if scene.shape in world.SHAPES]
    assert sum(judgements[i].shape == scenes[i].shape for i in base) / len(base) >= 0.98


def test_subject_rule_is_robust_to_blur_and_noise(rendered):
    scenes, images = rendered
    rng = np.random.default_rng(0)
    judgements = [judge(_degrade(image, rng)) for image in images]
    for shape in world.SHAPES + world.SUBJECT_SHAPES:
        rows = [i for i, scene in enumerate(scenes) if scene.shape == shape]
        correct = sum(subject_shape(judgements[i]) == shape for i in rows) / len(rows)
        assert correct >= 0.95, (shape, correct)


def test_subject_metrics_on_rendered_images():
    plus, circle = (world.Scene(s, "red", 0.5, 0.5, 0.5) for s in ("plus", "circle"))
    blue_circle = world.Scene("circle", "blue", 0.5, 0.5, 0.5)
    # subject prompt: a plus and a circle; other prompt "a large blue circle": a blue circle, a plus
    images = [world.render(s) for s in (plus, circle, blue_circle, plus)]
    ctx = MetricContext(
        images=images, prompts=["a zorp", "a zorp", "a large blue circle", "a large blue circle"],
        seeds=[0, 1, 0, 1], training_images=[], in_domain=[True, True, False, False],
    )
    drawn, kept = subject_drawn(ctx), others_kept(ctx)
    assert drawn["value"] == 0.5 and drawn["colour"] == 1.0 and drawn["n"] == 2
    assert kept["value"] == 0.5 and kept["shape"] == 0.5 and kept["as_subject"] == 0.5 and kept["n"] == 2


def test_demo_pretrain_refuses_subject(capsys):
    from sdtune.cli import main

    assert main(["demo", "pretrain", "--subject"]) == 2
    assert "--subject applies to" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_subject_round_end_to_end(tmp_path):
    from sdtune.cli import main

    assert main(["demo", "--subject", "--quick", "--output", str(tmp_path / "subject")]) == 0
    root = tmp_path / "subject"
    markdown = (root / "report.md").read_text()
    assert "judge_subject_drawn" in markdown and "judge_others_kept" in markdown
    assert "| textual-inversion | textual-inversion | finished |" in markdown
    assert "| lora-dreambooth | lora | finished |" in markdown
    evaluation = json.loads((root / "records" / "eval-lora-dreambooth-seed0.json").read_text())
    assert set(evaluation["metrics"]) == {"judge_subject_drawn", "judge_others_kept"}
    assert len(list((root / "data").glob("*.png"))) == 6
    assert any((root / ".class-images").rglob("*.png"))  # DreamBooth's class images were generated
