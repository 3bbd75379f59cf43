"""The trained-what-it-claims check (integration tier): a technique broken on purpose fails it, named
where it broke; the check's record is typed."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtune import records
from sdtune.experiment import load_experiment
from sdtune.techniques.adapter import LoKr, LoRA
from sdtune.techniques.textual_inversion import TextualInversion
from sdtune.training import train_technique

QUICK = {"max_train_steps": 2, "batch_size": 1, "gradient_accumulation_steps": 1}  # (LoRA's A: a gradient from step 2)


def _failures(result):
    check = records.trained_check(result.record)
    assert check is not None and result.status == "finished"
    return check, {(f["item"], f["where"]) for f in check.failures}


def _break(monkeypatch, technique, breaking):
    """``technique.make_trainable`` followed by ``breaking(model)``."""
    original = technique.make_trainable

    def make_trainable(self, model):
        original(self, model)
        breaking(model)

    monkeypatch.setattr(technique, "make_trainable", make_trainable)


def test_one_frozen_adapter_tensor_fails_the_check(write_experiment, monkeypatch):
    frozen = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight"
    _break(monkeypatch, LoRA, lambda model: model.denoiser.get_parameter(frozen[len("unet."):]).requires_grad_(False))
    result = train_technique(load_experiment(write_experiment(techniques={"lora": {"kind": "lora", "rank": 4}}, **QUICK)), "lora",
                             progress=False)
    check, failed = _failures(result)
    assert not check.passed and failed == {("adapter tensor", frozen)}
    assert records.check_failed(records.read_record(result.run_dir))  # as written to disk
    # the line `sdtune train` prints under the run's result
    assert records.check_failure_line(result.record) == f"lora: did not train what it claims (adapter tensor): {frozen}"


def test_a_bypass_that_zeroes_adapter_gradients_fails_the_check(write_experiment, monkeypatch):
    """A LoKr layer whose adapter gradients are zeroed (as a LoKr bypass did in another trainer): the
    loss goes down anyway, the check names the layer's tensors and its zero ΔW."""
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"

    def zero_gradients(model):
        for name, parameter in model.denoiser.named_parameters():
            if name.startswith(f"{layer}.lokr_"):
                parameter.register_hook(torch.zeros_like)

    _break(monkeypatch, LoKr, zero_gradients)
    techniques = {"lokr": {"kind": "lokr", "rank": 2, "alpha": 2}}
    result = train_technique(load_experiment(write_experiment(techniques=techniques, **QUICK)), "lokr", progress=False)
    check, failed = _failures(result)
    assert not check.passed
    assert {where for item, where in failed if item == "gradient"} == {
        f"unet.{name}" for name, _ in result.model.denoiser.named_parameters() if name.startswith(f"{layer}.lokr_")
    }
    assert ("adapter layer", f"unet.{layer}") in failed  # lokr_w1 starts at zero and never moves: ΔW = 0
    assert {item for item, _ in failed} == {"gradient", "moved", "adapter layer"}


def test_a_dropped_textual_inversion_vector_fails_the_check(write_experiment, monkeypatch):
    def drop_second_vector(model):
        vectors = model.components["text_encoder"].get_input_embeddings().vectors
        vectors.register_hook(lambda gradient: gradient * torch.tensor([[1.0], [0.0]]))

    _break(monkeypatch, TextualInversion, drop_second_vector)
    techniques = {"ti": {"kind": "textual-inversion", "placeholder_token": "<sks>", "initializer_token": "circle",
                         "num_vectors": 2, "learning_rate": 5e-2}}
    path = write_experiment(techniques=techniques, data={"instance_prompt": "a <sks>"}, **QUICK)
    result = train_technique(load_experiment(path), "ti", progress=False)
    check, failed = _failures(result)
    assert not check.passed and check.checked["rows"] == 2
    # (weight decay still moves the row a little: the gradient flag is what catches it)
    (failure,) = failed
    assert failure[0] == "vector" and failure[1].endswith("token_embedding.vectors[1] (<sks>_1)")


@pytest.mark.slow
def test_dora_that_trains_as_plain_lora_fails_the_check(write_experiment, monkeypatch):
    """OneTrainer's "fused DoRA" trained as plain LoRA (its #1666): here, magnitudes left frozen."""
    from sdtune.techniques.adapter import DoRA

    def freeze_magnitudes(model):
        for name, parameter in model.denoiser.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.requires_grad_(False)

    _break(monkeypatch, DoRA, freeze_magnitudes)
    result = train_technique(load_experiment(write_experiment(techniques={"dora": {"kind": "dora", "rank": 2}})), "dora",
                             progress=False)
    check, failed = _failures(result)
    items = {item for item, _ in failed}
    assert not check.passed and items == {"adapter tensor", "magnitude"}
    assert len([1 for item, _ in failed if item == "magnitude"]) == check.checked["adapted_layers"]


@pytest.mark.slow
def test_a_base_model_that_changed_between_sessions_fails_the_check_at_resume(write_experiment, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    path = write_experiment(model=model, max_train_steps=4)
    experiment = load_experiment(path)

    def stop_after_two(done):
        if done == 2:
            os.kill(os.getpid(), signal.SIGINT)

    half = train_technique(experiment, "lora", progress=False, after_step=stop_after_two)
    assert half.status == "interrupted" and not half.record["checks"]
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] + 0.5
    save_file(tensors, weights)
    resumed = train_technique(load_experiment(path), "lora", progress=False, resume=True)
    check, failed = _failures(resumed)
    assert not check.passed and failed == {("resume", "vae.decoder.conv_out.bias")}
