"""OFT/BOFT resume, and the LoRA variants (rsLoRA, PiSSA/OLoRA, LoRA+) through the real loaders.

The technique matrix (tests/test_training.py) covers OFT and BOFT like every technique; here: resume is
bit for bit with them and with LoRA+'s parameter groups, LoRA+ trains B at the ratio, and the files of
rsLoRA and of PiSSA/OLoRA (which rewrite the base weights while training) load on the *unmodified*
base model in diffusers (both files) and LyCORIS (the kohya file) as the trained model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_export import lycoris_modules

from sdtune.config import ConfigError
from sdtune.experiment import load_experiment
from sdtune.export import export_merged
from sdtune.generation import load_run_pipeline
from sdtune.models import FAMILIES
from sdtune.models.sampling import generate_images
from sdtune.techniques import TECHNIQUES, trainable_named_parameters
from sdtune.techniques.adapter import merge_adapters
from sdtune.training import train_technique
from sdtune.training.checkpoint import load_checkpoint

LORAPLUS = {"kind": "lora", "rank": 2, "loraplus_lr_ratio": 16, "lr_scheduler": "cosine"}


def _stop_at(step):
    def hook(done):
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


@pytest.mark.parametrize("options", [{"kind": "oft", "oft_block_size": 8, "lr_scheduler": "cosine"}, LORAPLUS],
                         ids=["oft", "loraplus"])
def test_resume_equals_uninterrupted_bit_for_bit(options, write_experiment, tmp_path):
    path = write_experiment(techniques={"t": options}, max_train_steps=4, batch_size=1, gradient_accumulation_steps=1)
    first = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'a'}"]), "t", progress=False)
    stopped = load_experiment(path, [f"output_dir={tmp_path / 'b'}"])
    assert train_technique(stopped, "t", progress=False, after_step=_stop_at(2)).status == "interrupted"
    checkpoint = tmp_path / "b" / "t" / "checkpoints" / "checkpoint-00000002"
    resumed = train_technique(stopped, "t", progress=False, resume=True)
    a, b = load_file(first.run_dir / "unet_adapter.safetensors"), load_file(resumed.run_dir / "unet_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in first.record["loss_history"]] == [h["loss"] for h in resumed.record["loss_history"]]
    if options["kind"] == "oft":  # `sdtune export --merged`: the rotation folded into plain weights, same images
        merged = FAMILIES.get("sd1").pipeline_class().from_pretrained(export_merged(first.run_dir, tmp_path / "merged"))
        assert not any("oft_" in key for key in merged.unet.state_dict())
        unmerged, _ = load_run_pipeline(first.run_dir, fuse=False, device=torch.device("cpu"))
        assert np.abs(_image(merged) - _image(unmerged)).max() <= 2.0
        assert np.abs(_image(merged) - _image(load_run_pipeline(tmp_path / "b" / "t", fuse=False)[0])).max() <= 2.0
    if options is LORAPLUS:  # the checkpoint holds LoRA+'s two groups, B's rate 16 × A's after 2 cosine steps
        groups = load_checkpoint(checkpoint)[1]["optimizer"]["param_groups"]
        assert len(groups) == 2 and groups[0]["lr"] < 1e-3
        assert groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"], rel=1e-12)


def _image(pipe):
    image = generate_images(pipe, ["a red circle"], [0], 3, 3.0, 32, progress=False).images[0]
    return np.asarray(image, dtype=np.float32)


def test_loraplus_puts_every_b_matrix_in_the_fast_group(write_experiment):

    options = {**LORAPLUS, "train_text_encoder": True}
    experiment = load_experiment(write_experiment(techniques={"t": options}))
    model = experiment.family.load(experiment.model)
    technique = TECHNIQUES.get("lora")(experiment.techniques["t"].options)
    technique.prepare(model)
    parameters = trainable_named_parameters(model)
    slow, fast = technique.parameter_groups(parameters, 1e-4)
    assert slow["lr"] == 1e-4 and fast["lr"] == pytest.approx(16e-4)
    names = {id(p): n for n, p in parameters.items()}
    assert {names[id(p)] for p in fast["params"]} == {n for n in parameters if ".lora_B." in n}
    assert {names[id(p)] for p in slow["params"]} == {n for n in parameters if ".lora_A." in n}
    assert any(n.startswith("text_encoder.") for n in parameters)
    plain = TECHNIQUES.get("lora")(dataclasses.replace(experiment.techniques["t"].options, loraplus_lr_ratio=None))
    assert [g["lr"] for g in plain.parameter_groups(parameters, 1e-4)] == [1e-4]


VARIANTS = {  # random (not zero) B where the init allows it, so every factor of the files matters
    "rslora": {"kind": "lora", "rank": 4, "alpha": 4, "use_rslora": True, "init_lora_weights": False},
    "pissa-rslora": {"kind": "lora", "rank": 2, "alpha": 3, "use_rslora": True, "init_lora_weights": "pissa",
                     "train_text_encoder": True},
    "olora": {"kind": "lora", "rank": 2, "alpha": 3, "init_lora_weights": "olora"},
}


def _effective_weights(model, components):
    """The trained model's plain weights (adapters merged into a copy)."""
    import copy

    result = {}
    for name in components:
        module = copy.deepcopy(model.components[name])
        merge_adapters(module)
        result[name] = module.state_dict()
    return result


def _assert_weights(pipe, expected, what):
    for component, state in expected.items():
        ours = getattr(pipe, component).state_dict()
        for key, value in state.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=f"{what}: {component}.{key}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_variant_files_load_on_the_unmodified_base(variant, write_experiment, tiny_model):
    options = VARIANTS[variant]
    experiment = load_experiment(write_experiment(techniques={variant: options}, max_train_steps=2))
    result = train_technique(experiment, variant, progress=False)
    spec, run_dir = FAMILIES.get("sd1"), result.run_dir
    components = ["unet", "text_encoder"] if options.get("train_text_encoder") else ["unet"]
    base = spec.load_pipeline(str(tiny_model))
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    in_memory = result.model.components["unet"].get_submodule(to_q).base_layer.weight
    original = base.unet.get_submodule(to_q).weight
    assert torch.equal(in_memory, original) != (options["init_lora_weights"] in ("pissa", "olora"))  # mutated base
    expected = _effective_weights(result.model, components)
    assert not torch.allclose(expected["unet"][f"{to_q}.weight"], original, atol=1e-4)  # the adapter did something

    # the kohya file: every layer carries the file's network alpha (ss_network_alpha); where peft's
    # scale (rsLoRA: alpha / √r) is not alpha / rank, the rest is folded into lora_up (the loaders
    # below read it as the trained model)
    rank, alpha = options["rank"], options["alpha"]
    converted = options["init_lora_weights"] in ("pissa", "olora")  # [A ; A₀]: rank 2r, the same scale
    file_alpha = alpha * ((math.sqrt(2) if options.get("use_rslora") else 2) if converted else 1)
    kohya = load_file(run_dir / "pytorch_lora_weights_kohya.safetensors")
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and all(kohya[k].shape[0] == (2 * rank if converted else rank) for k in downs)
    assert all(kohya[k.replace("lora_down.weight", "alpha")].item() == pytest.approx(file_alpha) for k in downs)

    # diffusers reads both files onto the original base: the trained model's weights
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        pipe = spec.load_pipeline(str(tiny_model))
        pipe.load_lora_weights(str(run_dir), weight_name=weight_name, adapter_name="x")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        _assert_weights(pipe, expected, weight_name)
    # LyCORIS merges the kohya file into the original base: the same
    pipe = spec.load_pipeline(str(tiny_model))
    for module in lycoris_modules(pipe, spec, kohya):
        module.merge_to(1.0)
    _assert_weights(pipe, expected, "LyCORIS")
    # sdtune generate (a fresh base + the run's files): the trained model's images
    reloaded, _ = load_run_pipeline(run_dir, fuse=False, device=torch.device("cpu"))
    trained = result.model.pipeline()
    assert np.abs(_image(reloaded) - _image(trained)).max() <= 1.0


def test_option_errors_are_one_line_with_the_fix(write_experiment, tmp_path):
    weights = tmp_path / "start.safetensors"
    weights.write_bytes(b"")
    cases = {
        "loraplus_lr_ratio: -1.0 is not allowed; expected a positive number": {"kind": "lora", "loraplus_lr_ratio": -1},
        "init_lora_weights: 'corda' needs a data or quantisation pass that sdtune does not run; choose one of: true, "
        "false, gaussian, orthogonal, pissa, pissa_niter_K, olora": {"kind": "lora", "init_lora_weights": "corda"},
        "init_lora_weights: 'pissa' with dora: .*; use kind: lora": {"kind": "dora", "init_lora_weights": "pissa"},
        "oft_block_size: not an option of technique kind 'boft'": {"kind": "boft", "oft_block_size": 8},
        "peft rejected the oft options: You can only specify either r": {"kind": "oft", "rank": 4, "oft_block_size": 8},
        "loraplus_lr_ratio: not an option of technique kind 'loha'": {"kind": "loha", "loraplus_lr_ratio": 4},
        "init_from: oft has no kohya/LyCORIS file to start from": {"kind": "oft", "init_from": str(weights)},
    }
    for message, options in cases.items():
        with pytest.raises(ConfigError, match=rf"^techniques\.t[.:] ?{message}") as error:
            load_experiment(write_experiment(techniques={"t": options}))
        assert "\n" not in str(error.value)
    experiment = load_experiment(write_experiment(techniques={"t": {"kind": "oft", "rank": 4}}))
    assert experiment.techniques["t"].options.peft == {"r": 4, "oft_block_size": 0}  # rank counts the blocks
    experiment = load_experiment(write_experiment(techniques={"t": {"kind": "boft", "boft_block_num": 8}}))
    assert experiment.techniques["t"].options.peft == {"boft_block_num": 8, "boft_block_size": 0}


def test_boft_butterfly_factor_is_never_silently_dropped(write_experiment, tmp_path):
    """Without its CUDA extension peft trains BOFT with one butterfly factor whatever was asked: refused."""
    from sdtune.techniques.oft import _butterfly_kernel_available

    experiment = load_experiment(write_experiment(techniques={"t": {"kind": "boft", "boft_n_butterfly_factor": 2}}))
    model = experiment.family.load(experiment.model)
    technique = TECHNIQUES.get("boft")(experiment.techniques["t"].options)
    if _butterfly_kernel_available():  # (a CUDA machine with nvcc and ninja): the factor is the one asked for
        technique.prepare(model)
        layer = model.components["unet"].get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        assert layer.boft_R["default"].shape[0] == 2
    else:
        with pytest.raises(ConfigError, match=r"^boft_n_butterfly_factor: 2 needs peft's fbd_cuda extension .*; "
                                              r"set boft_n_butterfly_factor: 1$"):
            technique.prepare(model)
        with pytest.raises(ConfigError, match=r"BOFT with boft_n_butterfly_factor 2 loads only where peft's fbd_cuda"):
            technique.load_into(None, tmp_path, experiment.techniques["t"].options_dict())  # (a GPU run's files, here)


def test_pissa_on_a_conv_layer_is_refused_before_peft_fails(write_experiment):

    options = {"kind": "lora", "rank": 2, "init_lora_weights": "olora", "target_modules": ["to_q", "conv1"]}
    experiment = load_experiment(write_experiment(techniques={"t": options}))
    model = experiment.family.load(experiment.model)
    with pytest.raises(ConfigError, match=r"^init_lora_weights: 'olora' works on linear layers only, and target_modules "
                                          r"match the Conv2d .*conv1 of the unet; target linear layers"):
        TECHNIQUES.get("lora")(experiment.techniques["t"].options).prepare(model)
