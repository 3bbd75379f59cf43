"""The opt-in human-preference metrics: HPS v2 on a tiny random CLIP built in code, ImageReward's
plumbing through a stand-in for the image-reward package (which cannot be imported beside
transformers 5), their one-line skips, their config keys and their place in the report."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image

from sdtune.metrics import (
    ClipScorer,
    ImageRewardScorer,
    MetricContext,
    compute_all,
    default_metric_names,
)
from sdtune.metrics.imagereward import checkpoint_files

PROMPTS = ["a red square", "yoda", "a red square"]
COLOURS = ("red", "blue", "green")


def _context(**extra) -> MetricContext:
    images = [Image.new("RGB", (32, 32), colour) for colour in COLOURS]
    return MetricContext(images=images, prompts=PROMPTS, seeds=[0, 0, 1], training_images=[], device="cpu", **extra)


def test_hpsv2_is_100_times_the_cosine_with_its_prompt_and_opt_in(tiny_clip_dir, tmp_path):
    assert not {"hpsv2", "imagereward"} & set(default_metric_names())
    ctx = _context(hpsv2_model=str(tiny_clip_dir))
    scored = compute_all(ctx, ["hpsv2"])["hpsv2"]
    scorer = ClipScorer.load(str(tiny_clip_dir))
    cosines = (scorer.image_embeddings(ctx.images) * scorer.text_embeddings(PROMPTS)).sum(axis=1)
    assert scorer.logit_scale != pytest.approx(100)  # so the scale below is HPS's 100, not the model's
    assert scored["skipped"] is None and scored["direction"] == "higher"
    assert scored["value"] == pytest.approx(100 * float(cosines.mean()), rel=1e-5)
    assert scored["details"]["n"] == 3
    missing = compute_all(_context(hpsv2_model=str(tmp_path / "no-hps")), ["hpsv2"])["hpsv2"]
    assert missing["value"] is None and "could not be loaded" in missing["skipped"]
    assert "evaluation.hpsv2_model" in missing["skipped"] and "\n" not in missing["skipped"]


def test_imagereward_without_the_package_is_one_skip_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # `import ImageReward` raises ImportError
    skipped = compute_all(_context(), ["imagereward"])["imagereward"]
    assert skipped["value"] is None and "\n" not in skipped["skipped"]
    assert "image-reward package" in skipped["skipped"] and "pip install 'sdtune[imagereward]'" in skipped["skipped"]


class _PackageModel:
    """Answers ``score(prompt, images)`` as image-reward 1.5 does: a list of rewards, squeezed to one
    float for a single image; the reward is the red share of the image, plus 1 for "yoda"."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def score(self, prompt: str, images: list[Image.Image]):
        self.calls.append((prompt, len(images)))
        rewards = [np.asarray(image)[..., 0].mean() / 255 + (prompt == "yoda") for image in images]
        return rewards[0] if len(rewards) == 1 else rewards


def _fake_package(monkeypatch, loaded: list, fail: bool = False) -> _PackageModel:
    model = _PackageModel()

    def load(name, device="cpu", download_root=None, med_config=None):
        if fail:
            raise RuntimeError(f"Model {name} not found; available models = ['ImageReward-v1.0']")
        loaded.append((name, device, med_config))
        return model

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    return model


def test_imagereward_loads_a_folder_through_the_package_and_scores_each_image_with_its_prompt(monkeypatch, tmp_path):
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    (tmp_path / "med_config.json").write_text("{}")
    assert checkpoint_files(str(tmp_path)) == (str(tmp_path / "ImageReward.pt"), str(tmp_path / "med_config.json"))
    assert checkpoint_files(str(tmp_path / "ImageReward.pt"))[1] == str(tmp_path / "med_config.json")
    assert checkpoint_files("ImageReward-v1.0") == ("ImageReward-v1.0", None)  # the package downloads it

    loaded: list = []
    model = _fake_package(monkeypatch, loaded)
    scored = compute_all(_context(imagereward_model=str(tmp_path)), ["imagereward"])["imagereward"]
    assert loaded == [(str(tmp_path / "ImageReward.pt"), "cpu", str(tmp_path / "med_config.json"))]
    assert sorted(model.calls) == [("a red square", 2), ("yoda", 1)]  # one call per prompt
    expected = [1.0, 1.0, 0.0]  # red for "a red square"; blue for "yoda" (+1); green for "a red square"
    assert ImageRewardScorer(model).scores(_context().images, PROMPTS).tolist() == pytest.approx(expected)
    assert scored["skipped"] is None and scored["value"] == pytest.approx(np.mean(expected))

    _fake_package(monkeypatch, [], fail=True)
    missing = compute_all(_context(imagereward_model=str(tmp_path / "none")), ["imagereward"])["imagereward"]
    assert missing["value"] is None and "\n" not in missing["skipped"]
    assert "not found" in missing["skipped"] and "evaluation.imagereward_model" in missing["skipped"]


def test_the_preference_metrics_are_configured_and_reported_like_pickscore(monkeypatch, tiny_clip_dir):
    from sdtune.config import EvaluationConfig
    from sdtune.records import EvalRecord
    from sdtune.report.render import tables
    from sdtune.report.summary import Row

    settings = EvaluationConfig(metrics=["pickscore", "hpsv2", "imagereward"], hpsv2_model=str(tiny_clip_dir))
    settings.validate()  # the names are registered metrics
    assert (EvaluationConfig().hpsv2_model, EvaluationConfig().imagereward_model) == ("adams-story/HPSv2-hf", "ImageReward-v1.0")
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    ctx = _context(hpsv2_model=settings.hpsv2_model, pickscore_model=str(tiny_clip_dir))
    metrics = compute_all(ctx, settings.metrics)
    record = EvalRecord(label="base", metrics=metrics, images=[], config={})
    title, header, body, note = next(t for t in tables([Row("base", "base model", evals=[record])]) if t[0] == "Quality metrics")
    assert header == ["Model", "pickscore", "hpsv2", "imagereward"]
    hps = metrics["hpsv2"]
    assert body[0][2] == f"{hps['value']:.3g} [{hps['details']['ci_low']:.3g}, {hps['details']['ci_high']:.3g}]"
    assert body[0][3] == "skipped"
    assert "imagereward: imagereward needs the image-reward package" in note
