"""The demo world (procedural captioned images) and its judge."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdtune.demo.judge import STYLE_CLASSES, Judgement, accuracy, judge, judge_many
from sdtune.demo.world import (
    BASE_BACKGROUND,
    COLOURS,
    DOMAINS,
    SHAPES,
    STYLE_BACKGROUND,
    VOCABULARY,
    Scene,
    all_combos,
    caption,
    load_scenes,
    render,
    sample_scenes,
    split_combos,
    write_imagefolder,
)

N_PER_DOMAIN = 300


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur (radius 1) and add Gaussian pixel noise (sigma 8), like a small model's samples."""
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
    arr = arr + rng.normal(0.0, 8.0, arr.shape)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module", params=DOMAINS)
def rendered(request):
    scenes = sample_scenes(N_PER_DOMAIN, seed=11, domain=request.param)
    return scenes, [render(scene) for scene in scenes]


# --------------------------------------------------------------------------------------------
# Generator


def test_sampling_is_deterministic_and_seed_dependent():
    assert sample_scenes(50, 3, "style") == sample_scenes(50, 3, "style")
    assert sample_scenes(50, 3, "style") != sample_scenes(50, 4, "style")
    base, style = sample_scenes(20, 3, "base"), sample_scenes(20, 3, "style")
    assert [(s.shape, s.colour, s.size, s.cx, s.cy) for s in base] == [
        (s.shape, s.colour, s.size, s.cx, s.cy) for s in style
    ]


def test_render_is_deterministic_rgb_and_sized():
    scene = sample_scenes(1, 0, "style")[0]
    image = render(scene)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.tobytes() == render(scene).tobytes()
    assert render(scene, 32).size == (32, 32)


def test_render_domains_differ_in_background():
    scene = Scene("circle", "red", 0.4, 0.5, 0.5, "base")
    corner_base = render(scene).getpixel((0, 0))
    corner_style = render(Scene("circle", "red", 0.4, 0.5, 0.5, "style")).getpixel((0, 0))
    assert corner_base == BASE_BACKGROUND and corner_style == STYLE_BACKGROUND


def test_sample_scenes_respects_combos_and_balances_them():
    combos = [("circle", "red"), ("triangle", "blue")]
    scenes = sample_scenes(40, 1, "base", combos=combos)
    assert Counter((s.shape, s.colour) for s in scenes) == {combo: 20 for combo in combos}
    assert all(0 <= s.cx - s.size / 2 and s.cx + s.size / 2 <= 1 for s in scenes)
    assert all(0 <= s.cy - s.size / 2 and s.cy + s.size / 2 <= 1 for s in scenes)
    with pytest.raises(ValueError):
        sample_scenes(5, 1, "cartoon")
    with pytest.raises(ValueError):
        sample_scenes(5, 1, "base", combos=[("hexagon", "red")])


def test_captions_never_name_the_style_and_use_the_vocabulary():
    scenes = sample_scenes(200, 2, "style") + sample_scenes(200, 2, "base")
    for scene in scenes:
        words = caption(scene).split()
        assert set(words) <= set(VOCABULARY)
        assert scene.shape in words and scene.colour in words
        assert not {"style", "base", "outline", "cartoon", "background", "cyan"} & set(words)
    assert caption(Scene("square", "green", 0.55, 0.5, 0.5, "style")) == "a large green square"
    assert caption(Scene("square", "green", 0.35, 0.5, 0.5), with_size=False) == "a green square"
    assert len(set(VOCABULARY)) == len(VOCABULARY)


def test_split_combos():
    tune, held = split_combos(seed=0, held_out_fraction=0.25)
    assert not set(tune) & set(held)
    assert sorted(tune + held) == sorted(all_combos())
    assert len(held) == round(0.25 * len(all_combos()))
    assert {s for s, _ in tune} == set(SHAPES) and {c for _, c in tune} == set(COLOURS)
    assert split_combos(seed=0) == (tune, held)
    assert split_combos(seed=1) != (tune, held)
    assert split_combos(held_out_fraction=0.0)[1] == []
    with pytest.raises(ValueError):
        split_combos(held_out_fraction=0.9)


def test_write_imagefolder(tmp_path):
    scenes = sample_scenes(6, 5, "style")
    out = write_imagefolder(tmp_path / "a", scenes)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": f"{i:05d}.png", "text": caption(s)} for i, s in enumerate(scenes)]
    for row, scene in zip(rows, scenes):
        with Image.open(out / row["file_name"]) as image:
            assert image.size == (64, 64) and image.tobytes() == render(scene).tobytes()
    assert load_scenes(out) == scenes
    again = write_imagefolder(tmp_path / "b", scenes)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert all((out / n).read_bytes() == (again / n).read_bytes() for n in names)
    other = write_imagefolder(tmp_path / "c", sample_scenes(6, 6, "style"))
    assert (other / "00000.png").read_bytes() != (out / "00000.png").read_bytes()


# --------------------------------------------------------------------------------------------
# Judge


def test_judge_agrees_with_ground_truth(rendered):
    scenes, images = rendered
    result = accuracy(judge_many(images), scenes)
    assert result["colour"] >= 0.98 and result["shape"] >= 0.98 and result["style"] >= 0.98
    expected = "full" if scenes[0].domain == "style" else "base"
    assert result["style_split"][expected] >= 0.98
    assert set(result["style_split"]) == set(STYLE_CLASSES)


def test_judge_is_robust_to_blur_and_noise(rendered):
    scenes, images = rendered
    rng = np.random.default_rng(0)
    result = accuracy(judge_many(_degrade(image, rng) for image in images), scenes)
    assert result["colour"] >= 0.95 and result["shape"] >= 0.95 and result["style"] >= 0.95


@pytest.mark.parametrize("outline, tinted", [(True, False), (False, True)])
def test_one_style_feature_is_partial(outline, tinted):
    scenes = sample_scenes(30, 4, "base")
    judgements = [judge(render(s, outline=outline, tinted_background=tinted)) for s in scenes]
    assert all(j.style == "partial" for j in judgements)
    result = accuracy(judgements, scenes)
    assert result["colour"] == 1.0 and result["shape"] == 1.0


def test_judge_accepts_arrays_and_finds_no_object_on_blank():
    scene = Scene("triangle", "purple", 0.5, 0.5, 0.5, "style")
    image = render(scene)
    from_pil = judge(image)
    assert judge(np.asarray(image)) == from_pil
    assert judge(np.asarray(image, dtype=np.float32) / 255.0).shape == "triangle"
    blank = judge(Image.new("RGB", (64, 64), BASE_BACKGROUND))
    assert (blank.colour, blank.shape, blank.style) == (None, None, "base")
    tinted = judge(Image.new("RGB", (64, 64), STYLE_BACKGROUND))
    assert tinted.shape is None and tinted.style == "partial"


def test_accuracy_counts():
    scenes = [Scene("circle", "red", 0.4, 0.5, 0.5), Scene("square", "blue", 0.4, 0.5, 0.5, "style")]
    judgements = [Judgement("red", "square", "base", 0.0, 0.0), Judgement(None, None, "partial", 0.5, 1.0)]
    result = accuracy(judgements, scenes)
    assert result["colour"] == 0.5 and result["shape"] == 0.0 and result["style"] == 0.5
    assert result["style_split"] == {"base": 0.5, "partial": 0.5, "full": 0.0}
    assert result["no_object"] == 0.5
    with pytest.raises(ValueError):
        accuracy(judgements, scenes[:1])
