"""DreamBooth's prior preservation: the loss formula, class images generated once and reused, exact
resume, one-line config errors."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune.config import ConfigError
from sdtune.experiment import load_experiment
from sdtune.training import train_technique
from sdtune.training.prior import class_images_folder, ensure_class_images, prior_preservation_loss

DREAMBOOTH = {"class_prompt": "a circle", "num_class_images": 3, "class_inference_steps": 2, "class_guidance_scale": 2.0}


def _write(write_experiment, techniques, **train):
    import yaml

    path = write_experiment(techniques=techniques, data={"instance_prompt": "a sks circle"}, **train)
    raw = yaml.safe_load(path.read_text())
    raw["dreambooth"] = DREAMBOOTH
    path.write_text(yaml.safe_dump(raw))
    return path


def test_loss_is_instance_loss_plus_weight_times_prior_loss():
    prediction = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 3.0], [1.0, -1.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 3.0], [1.0, 3.0], [0.0, 0.0]])
    instance = ((1 + 4) / 2 + (0 + 4) / 2) / 2  # per-sample mean squared error, then the mean
    prior = ((4 + 0) / 2 + (1 + 1) / 2) / 2
    assert prior_preservation_loss(prediction, target, None, 2, 0.5).item() == instance + 0.5 * prior
    weights = torch.tensor([2.0, 1.0, 1.0, 3.0])  # min-SNR-style per-sample weights apply inside each half
    weighted = ((1 + 4) / 2 * 2 + (0 + 4) / 2) / 2 + 0.5 * ((4 + 0) / 2 + (1 + 1) / 2 * 3) / 2
    assert prior_preservation_loss(prediction, target, weights, 2, 0.5).item() == weighted


def test_training_loss_follows_the_formula_and_class_images_are_made_once(write_experiment, tmp_path):
    techniques = {
        "plain": {"kind": "lora", "rank": 2},
        "prior": {"kind": "lora", "rank": 2, "prior_preservation": True},
        "prior3": {"kind": "lora", "rank": 2, "prior_preservation": True, "prior_loss_weight": 3.0},
    }
    experiment = load_experiment(_write(write_experiment, techniques, max_train_steps=1, gradient_accumulation_steps=1))
    records = {name: train_technique(experiment, name, progress=False).record for name in techniques}
    # the first step's loss is taken before any update: the same instance and class samples in every run
    plain, one, three = (records[n]["loss_history"][0]["loss"] for n in ("plain", "prior", "prior3"))
    prior = one - plain
    assert prior > 1e-3
    assert three == pytest.approx(plain + 3.0 * prior, rel=1e-5)
    # generated once by the first technique that needs them, then read by the others
    assert records["plain"]["timing"].get("class_images_generated") is None
    assert records["prior"]["timing"]["class_images_generated"] == 3
    assert records["prior3"]["timing"]["class_images_generated"] == 0
    folder = class_images_folder(experiment, tmp_path / "runs")
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]


@pytest.mark.slow  # (default tier under 6 min: over 10 s on 2 cores)
def test_class_images_are_deterministic_and_missing_ones_are_filled_in(write_experiment, tiny_model, tmp_path):

    experiment = load_experiment(_write(write_experiment, {"p": {"kind": "lora", "prior_preservation": True}}))
    model = experiment.family.load(experiment.model)
    folder, generated = ensure_class_images(experiment, model, tmp_path / "out", torch.device("cpu"), progress=False)
    assert generated == 3
    first = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    assert len(set(first.values())) == 3  # each from its own seed
    (folder / "00001.png").unlink()
    assert ensure_class_images(experiment, model, tmp_path / "out", torch.device("cpu"), progress=False)[1] == 1
    assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == first
    (folder / "00002.png").write_bytes(first["00002.png"][:100])  # cut short (a full disk, an older sdtune)
    assert ensure_class_images(experiment, model, tmp_path / "out", torch.device("cpu"), progress=False)[1] == 1
    assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == first  # drawn again, the same bits


def _interrupt_at(step):
    def hook(done):
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_resume_with_prior_preservation_is_bit_exact(write_experiment, family_model, tmp_path):
    techniques = {"lora": {"kind": "lora", "rank": 2, "prior_preservation": True, "train_text_encoder": True}}
    path = _write(write_experiment, techniques, max_train_steps=4, model=family_model("sdxl"))
    first = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'a'}"]), "lora", progress=False)
    stopped = load_experiment(path, [f"output_dir={tmp_path / 'b'}"])
    half = train_technique(stopped, "lora", progress=False, after_step=_interrupt_at(2))
    assert half.status == "interrupted" and half.record["timing"]["class_images_generated"] == 3
    resumed = train_technique(stopped, "lora", progress=False, resume=True)
    assert resumed.record["timing"]["class_images_generated"] == 0
    for file in ("unet_adapter.safetensors", "text_encoder_2_adapter.safetensors"):
        a, b = load_file(first.run_dir / file), load_file(resumed.run_dir / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [h["loss"] for h in first.record["loss_history"]]
    assert losses == [h["loss"] for h in resumed.record["loss_history"]] and np.all(np.isfinite(losses))


@pytest.mark.parametrize(
    ("techniques", "dreambooth", "message"),
    [
        ({"l": {"kind": "lora", "prior_preservation": True}}, None, "prior_preservation: true needs a `dreambooth:` section"),
        ({"t": {"kind": "textual-inversion", "placeholder_token": "<x>", "initializer_token": "red",
                "prior_preservation": True}}, DREAMBOOTH, "textual inversion trains only its new token"),
        ({"l": {"kind": "lora"}}, {"num_class_images": 3}, "dreambooth: missing required key 'class_prompt'"),
        ({"l": {"kind": "lora", "prior_loss_weight": 0}}, DREAMBOOTH, "prior_loss_weight: 0.0 is not allowed"),
    ],
)
def test_config_errors(techniques, dreambooth, message, write_experiment):
    import yaml

    path = write_experiment(techniques=techniques)
    raw = yaml.safe_load(path.read_text())
    if dreambooth is not None:
        raw["dreambooth"] = dreambooth
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_experiment(path)


@pytest.mark.slow  # 85 s on 2 cores: three fresh training processes and the evaluation
def test_compare_trains_a_subject_with_every_kind_of_technique_in_fresh_processes(write_experiment, tiny_clip_dir, tmp_path):
    """The user's path: `sdtune compare` trains each technique in its own process (the experiment
    travels as a resolved file), the class images are made by the first and read by the second, and
    the evaluation prompts name the subject by the placeholder."""
    import json

    import yaml

    from sdtune.comparison import compare

    techniques = {
        "lora-prior": {"kind": "lora", "rank": 2, "prior_preservation": True},
        "ti": {"kind": "textual-inversion", "placeholder_token": "<sks>", "initializer_token": "circle",
               "learning_rate": 5e-2},
        "full-prior": {"kind": "full", "prior_preservation": True},
    }
    path = _write(write_experiment, techniques, max_train_steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["instance_prompt"] = "a <sks> circle"
    raw["evaluation"] = {"prompts": ["a <sks> circle"], "out_of_domain_prompts": ["a red square"], "seeds_per_prompt": 1,
                         "num_inference_steps": 2, "guidance_scale": 3.0, "clip_model": str(tiny_clip_dir),
                         "max_reference_images": 4}
    path.write_text(yaml.safe_dump(raw))
    report = compare(load_experiment(path), output_dir=tmp_path / "out", progress=False)
    root = tmp_path / "out"
    trained = {name: json.loads((root / name / "record.json").read_text()) for name in techniques}
    assert all(record["status"] == "finished" for record in trained.values())
    made = sorted(trained[name]["timing"]["class_images_generated"] for name in ("lora-prior", "full-prior"))
    assert made == [0, 3]  # by whichever trained first
    assert (root / "ti" / "learned_embeds.safetensors").exists()
    images = json.loads((root / "records" / "eval-ti-seed0.json").read_text())["images"]
    assert [image["prompt"] for image in images] == ["a <sks> circle", "a red square"]
    assert report.exists() and "ti" in (root / "report.md").read_text()


def test_prior_preservation_with_buckets_is_refused_in_one_line(write_experiment):
    import yaml

    path = write_experiment(techniques={"l": {"kind": "lora", "prior_preservation": True}}, data={"buckets": "auto"})
    raw = yaml.safe_load(path.read_text())
    raw["dreambooth"] = DREAMBOOTH
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="cannot join aspect-ratio buckets yet; set data.buckets: null"):
        load_experiment(path)
