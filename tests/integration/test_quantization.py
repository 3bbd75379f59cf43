"""Quantised frozen bases (QLoRA): adapters train on an nf4/int8 denoiser, the quantised weights stay
exactly as loaded, the record says so, the run reloads and generates on the same base, and whatever
would train a quantised weight is refused in one line at load."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune.config import ConfigError
from sdtune.experiment import load_experiment
from sdtune.generation import load_run_pipeline
from sdtune.models import quantize
from sdtune.models.sampling import generate_images
from sdtune.training import train_technique
from sdtune.training.resume import ResumeMismatchError

PROMPTS = ["a red circle", "a blue square"]


def _images(pipe):
    result = generate_images(pipe, PROMPTS, [0], num_inference_steps=2, guidance_scale=3.0, resolution=32, progress=False)
    return np.stack([np.asarray(image, dtype=np.float32) for image in result.images])


def _quantized_lora(write_experiment, kind, **train):
    techniques = {f"q{kind}": {"kind": "lora", "rank": 2, "alpha": 2, "quantize": {"denoiser": kind}}}
    return load_experiment(write_experiment(techniques=techniques, max_train_steps=2, gradient_accumulation_steps=1, **train))


@pytest.mark.parametrize("kind", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_lora_trains_on_a_quantized_denoiser_and_reloads_on_it(kind, write_experiment, tmp_path):
    from sdtune.export import export_merged

    experiment = _quantized_lora(write_experiment, kind)
    item = experiment.techniques[f"q{kind}"]
    result = train_technique(experiment, f"q{kind}", progress=False)
    record = result.record
    assert result.status == "finished" and all(np.isfinite(h["loss"]) for h in record["loss_history"])

    # the record names the quantisation, and what it covered
    quantization = record["quantization"]
    assert (quantization["denoiser"], quantization["text_encoders"], quantization["backend"]) == (kind, None, "bitsandbytes")
    unet = quantization["components"]["unet"]
    assert unet["type"] == kind and unet["linear_layers"] > 0 and 0 < unet["quantized_share"] < 1
    assert unet["weight_bytes"] < unet["load_dtype_weight_bytes"]
    assert set(quantization["components"]) == {"unet"}  # the text encoder stayed in full precision
    assert record["config"]["techniques"][f"q{kind}"]["quantize"] == {"denoiser": kind}

    # only the adapter trained: every quantised tensor (packed data and statistics) is as loaded
    fresh = experiment.family.load(item.model)
    loaded, trained = quantize.quantized_state(fresh.denoiser), quantize.quantized_state(result.model.denoiser)
    assert loaded and loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[key], trained[key]) for key in loaded)
    assert record["parameters"]["trained_modules"] and all("lora_" in m for m in record["parameters"]["trained_modules"])
    trained_check = record["checks"]["trained"]  # the run's own check: adapters moved, the packed base did not
    assert trained_check["passed"] and not trained_check["failures"], trained_check["failures"]

    # the run reloads on the same quantised base (adapter unfused) and draws what the trained model draws
    expected = _images(result.model.pipeline())
    pipe, _ = load_run_pipeline(result.run_dir, device=torch.device("cpu"))
    assert quantize.quantization_of(pipe.unet) == kind
    assert np.abs(_images(pipe) - expected).max() <= 1.0
    full_precision, _ = load_run_pipeline(result.run_dir, device=torch.device("cpu"), full_precision_base=True)
    assert quantize.quantization_of(full_precision.unet) is None

    # export folds the adapter into the dequantised weights it trained on: plain layers, same images
    merged_dir = export_merged(result.run_dir, tmp_path / "merged")
    merged = result.model.pipeline_class().from_pretrained(merged_dir)
    assert not quantize.quantized_layers(merged.unet)
    assert not any("lora" in key for key in merged.unet.state_dict())
    assert np.abs(_images(merged) - expected).max() <= 2.0


@pytest.mark.parametrize(
    ("technique", "options"),
    [
        ("dora", {"rank": 2}),
        ("oft", {"oft_block_size": 8}),
        pytest.param("boft", {"boft_block_size": 4}, marks=pytest.mark.slow),  # (5-24 s measured, with the load)
        ("lora", {"rank": 2, "target_modules": ["to_q", "to_v", "conv1"]}),  # LoCon: convolutions stay unquantised
    ],
    ids=["dora", "oft", "boft", "locon"],
)
def test_adapters_with_a_quantized_layer_in_peft_wrap_it_and_get_gradients(technique, options, tiny_model):
    from sdtune.config import ModelConfig, QuantizeConfig
    from sdtune.models import model_class
    from sdtune.techniques import TECHNIQUES, trainable_named_parameters

    config = ModelConfig(path=str(tiny_model), quantize=QuantizeConfig(denoiser="nf4"))
    model = model_class(config).load(config)
    plugin = TECHNIQUES.get(technique)
    plugin(plugin.validate_options(options, technique)).prepare(model)
    wrapped = [type(m.get_base_layer()).__name__ for m in model.denoiser.modules() if hasattr(m, "base_layer")]
    assert "Linear4bit" in wrapped and set(wrapped) <= {"Linear4bit", "Conv2d"}
    before = quantize.quantized_state(model.denoiser)
    latents, conditioning = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 32)
    model.denoiser(latents, torch.tensor([10, 500]), conditioning).sample.pow(2).mean().backward()
    parameters = trainable_named_parameters(model)
    assert parameters and all(p.grad is not None for p in parameters.values())  # (LoRA's A: zero while B is)
    assert sum(float(p.grad.abs().sum()) for p in parameters.values()) > 0
    after = quantize.quantized_state(model.denoiser)
    assert all(torch.equal(before[key], after[key]) for key in before)
    # the anatomy (every run's finish) merges each adapter layer on a float64 copy: on a quantised
    # base, into the dequantised weight; the layer itself stays quantised
    from sdtune.anatomy.layers import adapter_layers, merged_pair

    for path, layer in adapter_layers(model.denoiser):
        weight_before, weight_after = merged_pair(layer)
        assert weight_before.dtype == weight_after.dtype == torch.float64 and weight_before.shape == weight_after.shape
        assert torch.isfinite(weight_after).all(), path
    assert quantize.quantized_state(model.denoiser).keys() == before.keys()


def test_a_technique_override_puts_lora_and_qlora_on_the_same_data(write_experiment):
    techniques = {
        "lora": {"kind": "lora", "rank": 2},
        "qlora": {"kind": "lora", "rank": 2, "quantize": {"denoiser": "nf4"}},
        "plain": {"kind": "lora", "rank": 2, "quantize": None},
    }
    path = write_experiment(techniques=techniques)
    experiment = load_experiment(path, ["model.quantize.text_encoders=int8"])
    specs = {name: experiment.techniques[name].model.quantize for name in techniques}
    assert (specs["lora"].denoiser, specs["lora"].text_encoders) == (None, "int8")
    assert (specs["qlora"].denoiser, specs["qlora"].text_encoders) == ("nf4", "int8")
    assert not specs["plain"].active
    assert experiment.data == load_experiment(path).data and experiment.train == load_experiment(path).train
    again = experiment.to_dict()
    assert again["techniques"]["qlora"]["quantize"] == {"denoiser": "nf4"}
    assert again["model"]["quantize"] == {"denoiser": None, "text_encoders": "int8"}


@pytest.mark.parametrize(
    ("technique", "quantize", "message"),
    [
        ({"kind": "full"}, {"denoiser": "nf4"}, "techniques.t: quantize.denoiser nf4: full fine-tuning trains every denoiser weight"),
        ({"kind": "partial"}, {"denoiser": "int8"}, "techniques.t: quantize.denoiser int8: partial fine-tuning trains denoiser weights"),
        ({"kind": "loha"}, {"denoiser": "nf4"}, "peft has no LoHa/LoKr layer for bitsandbytes-quantised layers"),
        ({"kind": "lokr"}, {"denoiser": "int8"}, "peft has no LoHa/LoKr layer for bitsandbytes-quantised layers"),
        ({"kind": "lora", "train_text_encoder": True}, {"text_encoders": "nf4"}, "trains the text encoders text_encoder, which quantize.text_encoders nf4"),
        ({"kind": "textual-inversion", "placeholder_token": "<x>", "initializer_token": "red"}, {"text_encoders": "int8"}, "trains the text encoders"),
        ({"kind": "lora", "init_lora_weights": "pissa"}, {"denoiser": "nf4"}, "init_lora_weights 'pissa' rewrites the base weights"),
        ({"kind": "lora"}, {"denoiser": "fp8"}, "techniques.t.quantize.denoiser: 'fp8' is not allowed; expected one of 'nf4', 'int8'"),
        ({"kind": "lora"}, {"unet": "nf4"}, "techniques.t.quantize.unet: unknown key"),
    ],
)
def test_what_would_train_a_quantized_weight_is_refused_in_one_line(technique, quantize, message, write_experiment):
    path = write_experiment(techniques={"t": {**technique, "quantize": quantize}})
    with pytest.raises(ConfigError) as raised:
        load_experiment(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_dora_on_int8_is_refused_on_the_cpu(write_experiment):
    with pytest.raises(ConfigError, match="int8 with dora does not train on the CPU"):
        load_experiment(write_experiment(techniques={"d": {"kind": "dora", "quantize": {"denoiser": "int8"}}}))


def test_full_fine_tuning_of_a_quantized_denoiser_is_one_line_and_exit_2(write_experiment):
    path = write_experiment(techniques={"full": {"kind": "full"}})
    result = subprocess.run(
        [sys.executable, "-m", "sdtune", "train", str(path), "--set", "model.quantize.denoiser=nf4"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sdtune: error: techniques.full: quantize.denoiser nf4: full fine-tuning trains every denoiser weight, and a "
        "quantised denoiser's weights are frozen 4/8-bit storage; use an adapter (lora, dora, oft, boft) for a "
        "quantised base, or set quantize: {denoiser: null} for this technique"
    ]


def test_quantization_without_bitsandbytes_names_the_install_command(write_experiment, monkeypatch):
    """Checked at the start of a run (preflight), like the savers' optional packages: the file still
    loads (``--plan`` and ``--estimate`` need no bitsandbytes), training names the install command."""
    import importlib.util

    from sdtune.preflight import check_training

    real_find_spec, real_import = importlib.util.find_spec, builtins.__import__
    hidden = lambda name: name == "bitsandbytes" or name.startswith("bitsandbytes.")  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if hidden(name) else real_find_spec(name, *a))

    def import_without_it(name, *args, **kwargs):
        if hidden(name):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_without_it)
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    path = write_experiment(techniques={"lora": {"kind": "lora"}, "q": {"kind": "lora", "quantize": {"denoiser": "nf4"}}})
    with pytest.raises(ConfigError) as raised:
        check_training(load_experiment(path, ["model.quantize.text_encoders=int8"]), "lora")
    assert str(raised.value) == (
        "model.quantize: quantised components need bitsandbytes; pip install 'sdtune[quantization]', or remove model.quantize"
    )
    with pytest.raises(ConfigError, match=r"^techniques\.q\.quantize: quantised components need bitsandbytes"):
        check_training(load_experiment(path), "q")
    check_training(load_experiment(path), "lora")  # (nothing quantised: nothing needed)
    with pytest.raises(quantize.QuantizationUnavailable, match=r"pip install 'sdtune\[quantization\]'"):
        quantize.bitsandbytes()


def test_block_swap_on_a_quantized_denoiser_is_refused_in_one_line(write_experiment):
    path = write_experiment(techniques={"q": {"kind": "lora", "block_swap": 1, "quantize": {"denoiser": "nf4"}}})
    with pytest.raises(ConfigError) as raised:
        load_experiment(path)
    assert str(raised.value).startswith("techniques.q: train.block_swap moves frozen weights as plain tensors")
    assert "\n" not in str(raised.value)


def _stop_at(step):
    def hook(done):
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_the_run_fingerprint_holds_each_techniques_quantization(write_experiment):
    """``model.quantize`` with the technique's override applied shapes the run: part of what a
    checkpoint is compared with on resume (a change is refused, not listed as safe)."""
    from sdtune.training.fingerprint import (
        SAFE_AT_THE_SAME_TOTAL_BATCH,
        SAFE_ON_RESUME,
        RunFingerprint,
        compare,
    )

    techniques = {"lora": {"kind": "lora"}, "q": {"kind": "lora", "quantize": {"denoiser": "nf4"}}}
    experiment = load_experiment(write_experiment(techniques=techniques), ["model.quantize.text_encoders=int8"])
    lora, q = (RunFingerprint.of_config(experiment, name).flat() for name in ("lora", "q"))
    assert lora["model.quantize"] == {"denoiser": None, "text_encoders": "int8"}
    assert q["model.quantize"] == {"denoiser": "nf4", "text_encoders": "int8"}
    assert "model.quantize" not in {**SAFE_ON_RESUME, **SAFE_AT_THE_SAME_TOTAL_BATCH}
    refused, accepted = compare(q, lora, steps_done=1)
    assert [change.key for change in refused] == ["model.quantize"] and not accepted


@pytest.mark.parametrize(  # three 2-step trainings each (~8 s on 2 idle cores)
    ("kind", "other"), [("nf4", "int8"), pytest.param("int8", "nf4", marks=pytest.mark.slow)]
)
def test_a_qlora_run_resumes_to_the_uninterrupted_run_and_refuses_another_quantization(kind, other, write_experiment, tmp_path):
    """Stopped after step 1 and resumed on the same quantised base: the adapter and losses of an
    uninterrupted run, bit for bit; resumed with another quantisation: refused in one line (the
    fingerprint's ``model.quantize``), nothing in the run folder touched."""
    techniques = {"q": {"kind": "lora", "rank": 2, "alpha": 2, "lr_scheduler": "constant", "quantize": {"denoiser": kind}}}
    path = write_experiment(techniques=techniques, max_train_steps=2, gradient_accumulation_steps=1)
    stopped = train_technique(load_experiment(path), "q", progress=False, after_step=_stop_at(1))
    assert stopped.status == "interrupted"
    before = sorted((str(p), p.stat().st_mtime_ns) for p in stopped.run_dir.rglob("*"))
    with pytest.raises(ResumeMismatchError) as raised:
        train_technique(load_experiment(path, [f"techniques.q.quantize.denoiser={other}"]), "q", resume=True, progress=False)
    assert "model.quantize" in str(raised.value) and f'"{other}"' in str(raised.value) and "\n" not in str(raised.value)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in stopped.run_dir.rglob("*")) == before

    resumed = train_technique(load_experiment(path), "q", resume=True, progress=False)
    straight = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'straight'}"]), "q", progress=False)
    assert resumed.status == "finished" and resumed.record["steps"] == {"done": 2, "max": 2}
    assert resumed.record["quantization"]["denoiser"] == kind
    a, b = (load_file(run.run_dir / "unet_adapter.safetensors") for run in (resumed, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.record["loss_history"]] == [h["loss"] for h in straight.record["loss_history"]]


def test_the_estimate_counts_each_techniques_quantized_denoiser(write_experiment):
    """``--estimate`` gives a technique's quantised UNet its quantised size (the override applied), the
    full-precision text encoder unchanged, each within 15 % of the bytes the quantised model holds."""
    import sdtune

    techniques = {
        "lora": {"kind": "lora", "rank": 2},
        "nf4": {"kind": "lora", "rank": 2, "quantize": {"denoiser": "nf4"}},
        "int8": {"kind": "lora", "rank": 2, "quantize": {"denoiser": "int8"}},
    }
    path = write_experiment(techniques=techniques)
    experiment = load_experiment(path)
    estimates = {e.technique: e.weights for e in sdtune.estimate_memory(experiment)}
    # under bf16 the unquantised rest (convolutions, norms) counts at 2 bytes, the quantised linears below
    bf16 = {e.technique: e.weights for e in sdtune.estimate_memory(load_experiment(path, ["train.mixed_precision=bf16"]))}
    assert bf16["nf4"]["unet"] < bf16["int8"]["unet"] < bf16["lora"]["unet"] < estimates["lora"]["unet"]
    assert estimates["nf4"]["unet"] < estimates["lora"]["unet"] and estimates["int8"]["unet"] < estimates["lora"]["unet"]
    assert estimates["nf4"]["text_encoder"] == estimates["int8"]["text_encoder"] == estimates["lora"]["text_encoder"]
    for name in ("nf4", "int8"):
        item = experiment.techniques[name]
        model = experiment.family.load(item.model)
        item.build().prepare(model)
        measured = quantize.weight_bytes(model.denoiser)
        assert abs(estimates[name]["unet"] - measured) <= 0.15 * measured, (name, estimates[name]["unet"], measured)
