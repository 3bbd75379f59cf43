"""Textual inversion: only the new token rows train (bit for bit), its files load in diffusers and in
sdtune with the same images, resume is exact, bad options fail in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune import records
from sdtune.config import ConfigError
from sdtune.experiment import load_experiment
from sdtune.training import train_technique

PROMPTS = ["a <sks> circle", "a red <sks>"]


def _ti(num_vectors=1, **extra):
    return {"ti": {"kind": "textual-inversion", "placeholder_token": "<sks>", "initializer_token": "circle",
                   "num_vectors": num_vectors, "learning_rate": 5e-2, **extra}}


def _images(pipe, prompts=PROMPTS):
    from sdtune.models.sampling import generate_images

    result = generate_images(pipe, prompts, [0], num_inference_steps=2, guidance_scale=3.0, resolution=32, progress=False)
    return np.stack([np.asarray(image, dtype=np.float32) for image in result.images])


def _base_state(model_dir, part):
    folder = model_dir / part
    weights = folder / "diffusion_pytorch_model.safetensors"
    return load_file(weights if weights.exists() else folder / "model.safetensors")


def _assert_only_new_rows_trained(result, model_dir, num_vectors):
    model = result.model
    for name, module in model.components.items():
        base = _base_state(model_dir, name)
        trained = {k: v.detach() for k, v in module.named_parameters()}  # (tied tables once: T5's)
        vectors = [k for k in trained if k.endswith(".vectors")]
        if name in model.loaded_text_encoders:
            (key,) = vectors  # the new rows, and nothing else, are a parameter of their own
            assert trained[key].shape[0] == num_vectors
            table = key.replace(".vectors", ".original.weight")
            initial = base[table.replace(".original", "")][model.tokenizers[name.replace("text_encoder", "tokenizer")]
                                                           .convert_tokens_to_ids("circle")]
            assert all(not torch.equal(row, initial) for row in trained[key]), "the new rows did not move"
        for key, value in trained.items():
            if key.endswith(".vectors"):
                continue
            assert torch.equal(value, base[key.replace(".original", "")]), f"{name}.{key} changed"


def _assert_checked_and_dissected(record, num_vectors, encoders):
    """The trained-what-it-claims check saw every vector of every encoder train; the anatomy's token
    tables changed in the new rows only (numerical rank ≤ the number of vectors)."""
    check = records.trained_check(record)
    assert check is not None and check.passed, check.failures
    assert check.checked["rows"] == num_vectors * encoders
    layers = record["anatomy"]["layers"]
    assert len(layers) == encoders and all(0 < layer["numerical_rank"] <= num_vectors for layer in layers)
    assert all(layer["effective_rank"] > 0 and layer["intruders"] is not None for layer in layers)


@pytest.mark.parametrize(("family", "num_vectors"), [("sd1", 2), ("sdxl", 1)])
def test_only_the_new_rows_train_and_the_files_load_in_diffusers(family, num_vectors, write_experiment, family_model, tmp_path):
    model_dir = family_model(family)
    path = write_experiment(techniques=_ti(num_vectors), model=model_dir, data={"instance_prompt": "a <sks> toy"})
    result = train_technique(load_experiment(path), "ti", progress=False)
    assert result.status == "finished"
    assert result.record["parameters"]["trainable"] == num_vectors * sum(
        result.model.components[n].get_input_embeddings().vectors.shape[1] for n in result.model.loaded_text_encoders)
    _assert_only_new_rows_trained(result, model_dir, num_vectors)
    _assert_checked_and_dissected(result.record, num_vectors, len(result.model.loaded_text_encoders))
    expected = _images(result.model.pipeline())

    run = result.run_dir
    diffusers_file = load_file(run / "learned_embeds.safetensors")
    assert list(diffusers_file) == ["<sks>"] and diffusers_file["<sks>"].shape[0] == num_vectors
    pipeline_class = result.model.pipeline_class()
    pipe = pipeline_class.from_pretrained(model_dir)
    community = load_file(run / "sks.safetensors")
    if family == "sd1":
        assert list(community) == ["emb_params"]
        pipe.load_textual_inversion(str(run))  # diffusers' own loader finds learned_embeds.safetensors
        via_community = pipeline_class.from_pretrained(model_dir)
        via_community.load_textual_inversion(str(run / "sks.safetensors"), token="<sks>")  # the A1111 file
    else:
        assert sorted(community) == ["clip_g", "clip_l"]
        pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
        pipe.load_textual_inversion(str(run / "learned_embeds_2.safetensors"), text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        via_community = pipeline_class.from_pretrained(model_dir)  # diffusers' documented SDXL recipe
        via_community.load_textual_inversion(community["clip_l"], token="<sks>")
        via_community.load_textual_inversion(community["clip_g"], token="<sks>", text_encoder=via_community.text_encoder_2,
                                             tokenizer=via_community.tokenizer_2)
    in_diffusers = _images(pipe)
    assert np.abs(in_diffusers - expected).max() <= 1.0
    assert np.array_equal(_images(via_community), in_diffusers)
    assert np.abs(in_diffusers - _images(pipeline_class.from_pretrained(model_dir))).max() > 0  # the token matters

    if family == "sd1":  # sdtune's own reload, in a fresh process: the same images as diffusers' loader
        out = tmp_path / "fresh"
        script = (
            "import numpy as np, torch; from sdtune.generation import load_run_pipeline, generate_images;"
            f"pipe, _ = load_run_pipeline({str(run)!r}, device=torch.device('cpu'));"
            f"r = generate_images(pipe, {PROMPTS!r}, [0], 2, 3.0, 32, progress=False);"
            f"np.save({str(out)!r}, np.stack([np.asarray(i, dtype=np.float32) for i in r.images]))"
        )
        subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        # (another process may use other thread counts: uint8 images at most one level of rounding apart)
        assert np.abs(np.load(f"{out}.npy") - in_diffusers).max() <= 1.0


def _interrupt_at(step):
    def hook(done):
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_resume_is_bit_exact(write_experiment, tmp_path):
    from sdtune.export import export_single_file

    # bf16: the frozen denoiser (not wrapped by accelerate) must still run under autocast
    path = write_experiment(techniques=_ti(2), data={"instance_prompt": "a <sks> toy"}, max_train_steps=4,
                            mixed_precision="bf16")
    first = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'a'}"]), "ti", progress=False)
    stopped = load_experiment(path, [f"output_dir={tmp_path / 'b'}"])
    half = train_technique(stopped, "ti", progress=False, after_step=_interrupt_at(2))
    assert half.status == "interrupted"
    resumed = train_technique(stopped, "ti", progress=False, resume=True)
    a, b = (load_file(r.run_dir / "learned_embeds.safetensors")["<sks>"] for r in (first, resumed))
    assert torch.equal(a, b)
    assert [h["loss"] for h in first.record["loss_history"]] == [h["loss"] for h in resumed.record["loss_history"]]
    # the check's evidence (gradient flags, the start's digests) travels through the checkpoint
    assert records.trained_check(resumed.record).passed and records.trained_check(resumed.record).checked["rows"] == 2
    with pytest.raises(ConfigError, match="--single-file: a textual-inversion run is an embedding"):
        export_single_file(resumed.run_dir, tmp_path / "ti.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"placeholder_token": "a b"}, "placeholder_token: 'a b' is not allowed"),
        ({"train_text_encoder": True}, "train_text_encoder: textual inversion trains only"),
        ({"num_vectors": 0}, "num_vectors: 0 is not allowed"),
        ({"text_encoders": ["text_encoder_9"]}, "not a text encoder of sd1"),
    ],
)
def test_bad_options_fail_at_load(change, message, write_experiment):
    technique = _ti()
    technique["ti"].update(change)
    with pytest.raises(ConfigError, match=message):
        load_experiment(write_experiment(techniques=technique))


def test_errors_found_at_training_start_are_one_line(write_experiment, tmp_path):
    no_placeholder = load_experiment(write_experiment(techniques=_ti()), [f"output_dir={tmp_path / 'a'}"])
    with pytest.raises(ConfigError, match="no caption contains the placeholder '<sks>'"):
        train_technique(no_placeholder, "ti", progress=False)
    technique = _ti()
    technique["ti"].update(placeholder_token="red")
    existing = load_experiment(write_experiment(techniques=technique), [f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(ConfigError, match="'red' is already a token"):
        train_technique(existing, "ti", progress=False)


def test_sd3_learns_the_token_in_both_clips_and_t5_and_reloads(write_experiment, family_model):
    from sdtune.generation import load_run_pipeline

    model_dir = family_model("sd3")
    path = write_experiment(techniques=_ti(), model=model_dir, data={"instance_prompt": "a <sks> toy"})
    result = train_technique(load_experiment(path), "ti", progress=False)
    _assert_only_new_rows_trained(result, model_dir, 1)
    assert sorted(load_file(result.run_dir / "sks.safetensors")) == ["clip_g", "clip_l", "t5xxl"]
    expected = _images(result.model.pipeline())
    pipe, _ = load_run_pipeline(result.run_dir, device=torch.device("cpu"))
    assert np.abs(_images(pipe) - expected).max() <= 1.0
    with pytest.raises(ConfigError, match="use num_vectors: 1 on sd3"):
        load_experiment(write_experiment(techniques=_ti(2), model=model_dir))
