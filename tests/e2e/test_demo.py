"""The built-in demo: the shipped base model is good, and a shortened demo runs end to end."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from sdtune.demo import world
from sdtune.demo.judge import judge_many
from sdtune.demo.metrics import prompt_targets
from sdtune.demo.run import DemoSettings, base_model_path, run_demo, torch_threads
from sdtune.models.sampling import generate_images

BAR = 0.8  # issue 4: the base model draws the captioned colour and shape in ≥ 80 % of samples


def test_prompt_targets():
    assert prompt_targets("a large red circle") == ("red", "circle")
    assert prompt_targets("yoda") == (None, None)


@pytest.mark.slow
def test_shipped_base_model_follows_prompts():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_model_path(), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.to(torch.device("cpu"))
    prompts = [f"a {size} {colour} {shape}" for shape, colour in world.all_combos() for size in world.SIZES]
    result = generate_images(pipe, prompts, [0], num_inference_steps=25, guidance_scale=4.0, resolution=64, progress=False)
    judgements = judge_many(result.images)
    targets = [prompt_targets(p) for p in result.prompts]
    colour = sum(j.colour == c for j, (c, _) in zip(judgements, targets)) / len(targets)
    shape = sum(j.shape == s for j, (_, s) in zip(judgements, targets)) / len(targets)
    styles = [j.style for j in judgements]
    assert colour >= BAR and shape >= BAR, (colour, shape)
    assert styles.count("base") >= BAR * len(styles)  # the base model draws the base look


def test_quick_demo_end_to_end(tmp_path):
    report = run_demo(tmp_path / "demo", quick=True, progress=False)
    root = report.parent
    markdown = (root / "report.md").read_text()
    assert "judge_prompt_accuracy" in markdown and "judge_style_split (share of images)" in markdown
    assert "| full | full | finished |" in markdown and "| lora | lora | finished |" in markdown
    evaluation = json.loads((root / "records" / "eval-lora-seed0.json").read_text())
    assert set(evaluation["metrics"]) == {
        "judge_prompt_accuracy", "judge_heldout_accuracy", "judge_full_style", "judge_style_split"
    }
    shares = evaluation["metrics"]["judge_style_split"]["value"]
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert (root / "experiment.yaml").exists() and (root / "data" / "metadata.jsonl").exists()
    # quality over training and the validation loss on the held-out style images, drawn in the report
    step = json.loads((root / "records" / "eval-lora-seed0-step1.json").read_text())
    assert step["step"] == 1 and step["metrics"]["judge_prompt_accuracy"]["skipped"] is None
    train = json.loads((root / "records" / "train-lora-seed0.json").read_text())
    assert [e["step"] for e in train["evaluation"]] == [0, 1, 2]
    full = json.loads((root / "records" / "train-full-seed0.json").read_text())
    assert all(math.isfinite(e["validation_loss"]) and e["validation_loss"] > 0 for e in train["evaluation"])
    # at step 0 every technique is the base model (LoRA's B starts at zero): the same fixed-noise loss
    assert train["evaluation"][0]["validation_loss"] == pytest.approx(full["evaluation"][0]["validation_loss"], rel=1e-6)
    assert train["evaluation"][-1]["validation_loss"] != full["evaluation"][-1]["validation_loss"]
    assert "Quality over training steps" in markdown and "Validation loss over training" in markdown
    # what each technique changed: both checked, and the generated answer to the study's question
    assert "| full | passed |" in markdown and "| lora | passed |" in markdown
    assert "Compared here: full fine-tuning and LoRA (the study's pair)." in markdown


def test_demo_processes_use_one_torch_thread_unless_the_user_chose(monkeypatch):
    """The demo runs itself and its training processes (which read OMP_NUM_THREADS) on one torch
    thread, then puts both back; a user's OMP_NUM_THREADS is left as it is."""
    assert DemoSettings().torch_threads == 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with torch_threads(1):
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    assert "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with torch_threads(1):
        assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
