"""Model families: detection, conditioning (against the diffusers pipelines), objective-specific keys,
SD2 v-prediction, SDXL micro-conditioning and kohya files, SD3 without T5, a separate VAE."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from sdtune.config import ConfigError
from sdtune.data.dataset import crop_geometry
from sdtune.experiment import load_experiment
from sdtune.generation import load_run_pipeline
from sdtune.models import ModelLoadError, detect_family_name, model_class
from sdtune.models.sampling import generate_images
from sdtune.training import train_technique


def _load(family_model, family, **model):
    from sdtune.config import ModelConfig

    config = ModelConfig(path=str(family_model(family)), **model)
    config = dataclasses.replace(config, family=detect_family_name(config))
    return model_class(config), config


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3"])
def test_auto_detects_each_family(family, family_model):
    from sdtune.config import ModelConfig

    assert detect_family_name(ModelConfig(path=str(family_model(family)))) == family


def test_hub_id_offline_needs_model_family(write_experiment):
    with pytest.raises(ConfigError, match="set model.family"):
        load_experiment(write_experiment(model="some-org/some-model"))
    experiment = load_experiment(write_experiment(model={"path": "some-org/some-model", "family": "sdxl"}))
    assert experiment.model.family == "sdxl" and experiment.data.resolution == 32  # (set by the test file)


@pytest.mark.parametrize(
    ("family", "prompt_kwargs"),
    [
        ("sd1", {}),
        ("sdxl", {}),
        ("sd3", {"prompt_2": None, "prompt_3": None, "max_sequence_length": 77}),
        ("sd3-no-t5", {"prompt_2": None, "prompt_3": None, "max_sequence_length": 77}),
    ],
)
def test_conditioning_equals_the_pipelines_own(family, prompt_kwargs, family_model):
    """What the loop trains on is what the pipeline samples with."""
    model = {"text_encoder_3": False} if family == "sd3-no-t5" else {}
    spec, config = _load(family_model, family.split("-")[0] if family != "sd3-no-t5" else "sd3-no-t5", **model)
    model = spec.load(config)
    pipe = model.pipeline()
    captions = ["a red circle", "a large blue square"]
    with torch.no_grad():
        ours = model.encode_prompt(captions)
        theirs = pipe.encode_prompt(
            captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False, **prompt_kwargs
        )
    if family == "sd1":
        torch.testing.assert_close(ours["prompt_embeds"], theirs[0])
        return
    torch.testing.assert_close(ours["prompt_embeds"], theirs[0])
    torch.testing.assert_close(ours["pooled_prompt_embeds"], theirs[2])


def test_objective_keys_belong_to_their_families(write_experiment, family_model):
    with pytest.raises(ConfigError, match=r"train.timestep_sampling: applies to flow families \(sd3\), not to sd1"):
        load_experiment(write_experiment(timestep_sampling="logit_normal"))
    with pytest.raises(ConfigError, match=r"train.snr_gamma: applies to ddpm families .*not to sd3"):
        load_experiment(write_experiment(model=family_model("sd3"), snr_gamma=5.0))
    techniques = {"lora": {"kind": "lora", "flow_weighting": "cosmap"}}
    with pytest.raises(ConfigError, match="techniques.lora.flow_weighting: applies to flow"):
        load_experiment(write_experiment(techniques=techniques))
    with pytest.raises(ConfigError, match="model.text_encoder_3: only SD3"):
        load_experiment(write_experiment(model={"path": str(family_model("sdxl")), "text_encoder_3": False}))
    with pytest.raises(ConfigError, match="'text_encoder_3' is not a text encoder of sdxl"):
        load_experiment(write_experiment(
            model=family_model("sdxl"), techniques={"l": {"kind": "lora", "train_text_encoder": True,
                                                          "text_encoders": ["text_encoder_3"]}}))
    with pytest.raises(ConfigError, match="'cross-attention' is not a preset of sd3; choose one of: context, attention"):
        load_experiment(write_experiment(model=family_model("sd3"), techniques={"p": {"kind": "partial", "preset": "cross-attention"}}))
    # flow defaults are filled in, so the record says what was used
    sd3 = load_experiment(write_experiment(model=family_model("sd3"), flow_weighting="cosmap"))
    train = sd3.train_config_for("lora")
    assert (train.timestep_sampling, train.logit_mean, train.logit_std, train.flow_weighting) == (
        "logit_normal", 0.0, 1.0, "cosmap")


def test_native_resolution_is_the_default(write_experiment, family_model, tmp_path):
    path = write_experiment(model=family_model("sdxl"))
    raw = yaml.safe_load(path.read_text())
    del raw["data"]["resolution"]
    path.write_text(yaml.safe_dump(raw))
    assert load_experiment(path).data.resolution == 32  # sample_size 16 × VAE factor 2 (1024 for real SDXL)


def test_sd2_v_prediction_trains_saves_and_samples_v(write_experiment, family_model):
    experiment = load_experiment(write_experiment(model=family_model("sd2"), techniques={"full": {"kind": "full"}}))
    result = train_technique(experiment, "full", progress=False)
    record = result.record
    assert record["model"]["family"] == "sd2"
    assert record["objective"]["name"] == "ddpm" and record["prediction_type"] == "v_prediction"
    saved = json.loads((result.run_dir / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    pipe, _ = load_run_pipeline(result.run_dir, device=torch.device("cpu"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    images = generate_images(pipe, ["a red circle"], [0], 2, 3.0, 32, progress=False).images
    assert images[0].size == (32, 32)


def test_v_target_is_what_the_sd2_loop_regresses(write_experiment, family_model, monkeypatch):
    """The loss the loop records at step 1 is the MSE to the v target (Salimans & Ho 2022), not to ε."""
    from sdtune import diffusion

    seen = {}
    real_loss = diffusion.diffusion_loss

    def spy(prediction, target, weights=None, mask=None):
        seen.setdefault("target", target.detach().clone())
        return real_loss(prediction, target, weights, mask)

    real_objective = diffusion.DDPMObjective.target

    def target(self, latents, noise, timesteps):
        seen.setdefault("v", diffusion.velocity(latents, noise, timesteps, self.alphas_cumprod))
        seen.setdefault("noise", noise.clone())
        return real_objective(self, latents, noise, timesteps)

    monkeypatch.setattr(diffusion, "diffusion_loss", spy)
    monkeypatch.setattr(diffusion.DDPMObjective, "target", target)
    experiment = load_experiment(write_experiment(model=family_model("sd2"), techniques={"lora": {"kind": "lora"}}))
    train_technique(experiment, "lora", progress=False)
    torch.testing.assert_close(seen["target"], seen["v"])
    assert not torch.allclose(seen["target"], seen["noise"])


def test_crop_geometry_for_micro_conditioning():
    # 48×40 image (width × height) at 32 px: shorter side 40 → 32, width 48 → 38; 6 px free on x
    assert crop_geometry((48, 40), 32, None, False) == (40, 48, 0, 3, 32, 32)
    assert crop_geometry((48, 40), 32, (1.0, 0.0), False) == (40, 48, 0, 6, 32, 32)
    assert crop_geometry((48, 40), 32, (1.0, 0.0), True) == (40, 48, 0, 0, 32, 32)  # mirrored crop


def test_sdxl_time_ids_come_from_each_samples_real_size(write_experiment, family_model, monkeypatch):
    from sdtune.models.sdxl import StableDiffusionXL

    seen = []
    real = StableDiffusionXL.predict

    def spy(self, noisy, timesteps, conditioning):
        seen.append(conditioning["time_ids"].clone())
        return real(self, noisy, timesteps, conditioning)

    monkeypatch.setattr(StableDiffusionXL, "predict", spy)
    experiment = load_experiment(write_experiment(model=family_model("sdxl"), data={"center_crop": False, "cache": "off"}))
    train_technique(experiment, "lora", progress=False)
    time_ids = torch.cat(seen)
    assert time_ids.shape[1] == 6
    assert (time_ids[:, :2] == torch.tensor([40.0, 48.0])).all()  # the fixture's images are 48×40
    assert (time_ids[:, 4:] == 32).all() and (time_ids[:, 3] >= 0).all() and (time_ids[:, 3] <= 6).all()
    assert len(set(time_ids[:, 3].tolist())) > 1  # random crops: different left edges


def test_sdxl_kohya_file_loads_in_diffusers_with_the_same_effect(write_experiment, family_model):
    """The kohya-format file (lora_unet_/lora_te1_/lora_te2_) read by a real loader gives the same images."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    techniques = {"lora": {"kind": "lora", "rank": 4, "alpha": 8, "train_text_encoder": True}}
    experiment = load_experiment(write_experiment(model=family_model("sdxl"), techniques=techniques))
    run_dir = train_technique(experiment, "lora", progress=False).run_dir
    kohya = load_file(run_dir / "pytorch_lora_weights_kohya.safetensors")
    prefixes = {key.split("_")[1] for key in kohya}
    assert {k.split(".")[0].split("_")[0] + "_" + k.split("_")[1] for k in kohya} == {"lora_unet", "lora_te1", "lora_te2"}
    assert prefixes == {"unet", "te1", "te2"}

    def images(weight_name):
        pipe = StableDiffusionXLPipeline.from_pretrained(family_model("sdxl"), add_watermarker=False)
        pipe.load_lora_weights(str(run_dir), weight_name=weight_name)
        pipe.fuse_lora()
        result = generate_images(pipe, ["a red circle"], [0], 3, 3.0, 32, progress=False)
        return np.asarray(result.images[0], dtype=np.float32)

    ours = images("pytorch_lora_weights.safetensors")
    base = StableDiffusionXLPipeline.from_pretrained(family_model("sdxl"), add_watermarker=False)
    assert np.abs(np.asarray(generate_images(base, ["a red circle"], [0], 3, 3.0, 32, progress=False).images[0],
                             dtype=np.float32) - ours).max() > 0  # the LoRA does something
    assert np.abs(images("pytorch_lora_weights_kohya.safetensors") - ours).max() <= 1.0


def test_sd3_lora_loads_with_the_pipelines_own_loader(write_experiment, family_model):
    from diffusers import StableDiffusion3Pipeline

    techniques = {"lora": {"kind": "lora", "rank": 4, "train_text_encoder": True}}
    experiment = load_experiment(write_experiment(model=family_model("sd3"), techniques=techniques))
    result = train_technique(experiment, "lora", progress=False)
    assert result.record["objective"]["name"] == "flow" and result.record["objective"]["shift"] == 3.0
    pipe = StableDiffusion3Pipeline.from_pretrained(family_model("sd3"))
    pipe.load_lora_weights(str(result.run_dir), weight_name="pytorch_lora_weights.safetensors")
    ours, _ = load_run_pipeline(result.run_dir, fuse=False, device=torch.device("cpu"))
    expected = generate_images(ours, ["a red circle"], [0], 3, 3.0, 32, progress=False).images[0]
    got = generate_images(pipe, ["a red circle"], [0], 3, 3.0, 32, progress=False).images[0]
    assert np.abs(np.asarray(got, dtype=np.float32) - np.asarray(expected, dtype=np.float32)).max() <= 1.0
    assert not (result.run_dir / "pytorch_lora_weights_kohya.safetensors").exists()  # SD3: the diffusers file


def test_separate_vae_is_used(write_experiment, family_model, tmp_path):
    from safetensors.torch import load_file

    from sdtune.testing.tiny import build_tiny_sdxl_pipeline

    other = tmp_path / "other"
    build_tiny_sdxl_pipeline(other, seed=7)  # same architecture, other weights: stands in for the fp16-fix VAE
    model = {"path": str(family_model("sdxl")), "vae": str(other / "vae")}
    experiment = load_experiment(write_experiment(model=model, techniques={"full": {"kind": "full"}}))
    model = experiment.family.load(experiment.model)
    expected = load_file(other / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in expected.items())
    run_dir = train_technique(experiment, "full", progress=False).run_dir
    saved = load_file(run_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in expected.items())  # the whole pipeline carries it


def test_sd3_without_t5_loads_trains_and_reloads_without_it(write_experiment, family_model):
    model = {"path": str(family_model("sd3")), "text_encoder_3": False}
    experiment = load_experiment(write_experiment(model=model, techniques={"full": {"kind": "full"}}))
    model = experiment.family.load(experiment.model)
    assert "text_encoder_3" not in model.components and model.loaded_text_encoders == ["text_encoder", "text_encoder_2"]
    result = train_technique(experiment, "full", progress=False)
    assert "text_encoder_3" not in result.record["parameters"]["components"]
    pipe, _ = load_run_pipeline(result.run_dir, device=torch.device("cpu"))
    assert pipe.text_encoder_3 is None


def test_unknown_model_folder_is_one_clear_error(tmp_path, write_experiment):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match="is a FluxPipeline, which no registered family trains"):
        load_experiment(write_experiment(model=folder))
    with pytest.raises(ModelLoadError):
        from sdtune.config import ModelConfig

        detect_family_name(ModelConfig(path=str(tmp_path)))
