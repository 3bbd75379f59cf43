"""The memory savers (docs/memory.md): each gives the training it claims to, or is refused in one line.

Tier: integration (tiny models, 2–3 steps each). On a CPU-only machine the savers that move weights
between a GPU and the CPU are run on a *fake device split*: what would wait on the CPU waits on the
meta device instead, where it cannot be computed with. A run that finishes with the same losses and
weights as one without the saver proves that nothing used a parked weight while it was away and that
the moves keep the maths exact; it proves nothing about transfer speed or GPU memory (the benchmark
measures that where a GPU is lent: docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from sdtune.config import ConfigError
from sdtune.experiment import load_experiment
from sdtune.training import savers, train_technique

FULL = {"full": {"kind": "full"}}
LORA = {"lora": {"kind": "lora", "rank": 4, "alpha": 8}}


def _weights(run_dir, part):
    """A full run's component weights, or an adapter run's ``<part>_adapter.safetensors``."""
    whole = run_dir / part / "diffusion_pytorch_model.safetensors"
    return load_file(whole if whole.exists() else run_dir / f"{part}_adapter.safetensors")


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler")  # (a false alarm: the steps ran in backward)
def test_fused_backward_gives_the_same_weights_as_the_step_after_backward(write_experiment, tmp_path):
    """Where it applies (one micro-batch a step, no clipping), stepping each tensor in its gradient
    hook is the same AdamW as stepping all of them after the backward pass: the same weights, bit for bit."""
    settings = {"gradient_accumulation_steps": 1, "max_grad_norm": None, "max_train_steps": 2}
    runs = {}
    for fused in (False, True):
        experiment = load_experiment(
            write_experiment(techniques=FULL, **settings, fused_backward=fused), [f"output_dir={tmp_path / str(fused)}"]
        )
        runs[fused] = train_technique(experiment, "full", progress=False)
    normal, fused = _weights(runs[False].run_dir, "unet"), _weights(runs[True].run_dir, "unet")
    assert normal.keys() == fused.keys()
    assert all(torch.equal(normal[name], fused[name]) for name in normal)
    assert [e["loss"] for e in runs[True].record["loss_history"]] == [e["loss"] for e in runs[False].record["loss_history"]]
    assert runs[True].record["memory"]["savers"]["fused_backward"] is True
    # the trained check: the gradients were freed inside the backward pass, so they go unobserved (not
    # "never got one"); the digests show every tensor moved
    checks = {fused: runs[fused].record["checks"]["trained"] for fused in runs}
    assert checks[True]["passed"] and checks[True]["gradient_watch_steps"] is None, checks[True]["failures"]
    assert checks[False]["passed"] and checks[False]["gradient_watch_steps"] == 1


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"fused_backward": True, "max_grad_norm": None}, "gradients cannot accumulate; set gradient_accumulation_steps: 1"),
        ({"fused_backward": True, "gradient_accumulation_steps": 1}, "set max_grad_norm: null"),
        ({"optimizer_offload": True, "optimizer": "paged_adamw"}, "are paged to the CPU already"),
        ({"use_8bit_adam": True}, "train.use_8bit_adam: renamed; write train.optimizer: adamw8bit"),
        ({"block_swap": -1}, "train.block_swap: -1 is not allowed"),
        ({"optimizer": "sgd"}, "train.optimizer: 'sgd' is not allowed; expected one of 'adamw', 'adamw8bit'"),
    ],
)
def test_saver_combinations_that_cannot_be_honoured_fail_at_load(write_experiment, train, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(write_experiment(**train))


def test_free_encoders_needs_every_input_cached(write_experiment):
    with pytest.raises(ConfigError, match="train.free_encoders: the encoders can leave only once every input"):
        load_experiment(write_experiment(free_encoders=True, data={"cache": "off"}))


@pytest.mark.parametrize(
    ("train", "evaluation", "message"),
    [
        ({"optimizer_offload": True}, {}, "train.optimizer_offload: true needs a CUDA GPU"),
        ({"free_encoders": True}, {}, "train.free_encoders: true needs a CUDA GPU"),
        ({"block_swap": 1}, {}, "train.block_swap: 1 needs a CUDA GPU"),
        ({}, {"cpu_offload": True}, "evaluation.cpu_offload: true needs a CUDA GPU"),
    ],
)
def test_cuda_only_savers_are_refused_on_the_cpu_in_one_line(write_experiment, train, evaluation, message):
    experiment = load_experiment(write_experiment())  # (the keys set below, past load's optional-package check)
    config = dataclasses.replace(experiment.train_config_for("lora"), **train)
    evaluation_config = experiment.evaluation.__class__(**evaluation)
    with pytest.raises(savers.DeviceSaverError, match=message) as error:
        savers.check_device(config, evaluation_config, torch.device("cpu"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("train", "package", "message"),
    [
        ({"optimizer_offload": True}, "torchao", "train.optimizer_offload: true needs a CUDA GPU"),
        ({"optimizer": "paged_adamw8bit"}, "bitsandbytes", "train.optimizer: paged_adamw8bit needs a CUDA GPU"),
    ],
)
def test_a_cuda_only_saver_on_the_cpu_names_the_gpu_not_a_package(write_experiment, monkeypatch, train, package, message):
    """Without its package too, the CPU's refusal is the one that holds: installing the package would
    not make the saver run here."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    experiment = load_experiment(write_experiment(techniques=LORA, **train))
    with pytest.raises(savers.DeviceSaverError, match=message):
        train_technique(experiment, "lora", progress=False)


def test_free_encoders_encodes_everything_first_then_never_touches_them(write_experiment, tmp_path, monkeypatch):
    """Fake split: the VAE and text encoder go to the meta device after the encode-ahead; the run
    (with dropped captions, whose empty conditioning is encoded ahead too) still trains exactly as
    without the saver."""
    settings = {"max_train_steps": 2, "caption_dropout": 0.5}
    plain = load_experiment(write_experiment(techniques=LORA, data={"cache": "memory"}, **settings),
                            [f"output_dir={tmp_path / 'plain'}"])
    expected = train_technique(plain, "lora", progress=False)
    monkeypatch.setattr(savers, "PARKING_DEVICE", "meta")
    freed = load_experiment(write_experiment(techniques=LORA, data={"cache": "memory"}, free_encoders=True, **settings),
                            [f"output_dir={tmp_path / 'freed'}"])
    result = train_technique(freed, "lora", progress=False)
    assert result.record["memory"]["savers"]["parked_encoders"] == ["vae", "text_encoder"]
    assert result.model.components["vae"].device.type == "meta"
    assert [e["loss"] for e in result.record["loss_history"]] == [e["loss"] for e in expected.record["loss_history"]]
    assert result.record["timing"]["encoded_images"] == expected.record["timing"]["encoded_images"]


@pytest.mark.parametrize(
    "checkpointing", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "checkpointing"]
)
def test_block_swap_trains_exactly_as_without_it(write_experiment, family_model, tmp_path, monkeypatch, checkpointing):
    """Fake split on SD3: the last transformer block's frozen weights wait on the meta device and come
    in for its forward and its backward (with gradient checkpointing: its recomputed forward too); the
    adapter trains to the same weights, and at most one swapped block is ever in."""
    model = family_model("sd3")
    settings = {"max_train_steps": 2, "gradient_checkpointing": checkpointing}
    plain = load_experiment(write_experiment(techniques=LORA, model=model, **settings), [f"output_dir={tmp_path / 'plain'}"])
    expected = train_technique(plain, "lora", progress=False)
    monkeypatch.setattr(savers, "PARKING_DEVICE", "meta")
    swapped = load_experiment(write_experiment(techniques=LORA, model=model, block_swap=1, **settings),
                              [f"output_dir={tmp_path / 'swapped'}"])
    result = train_technique(swapped, "lora", progress=False)
    record = result.record["memory"]["savers"]["block_swap"]
    micro_steps = 2 * 2  # steps × accumulation: each brings the block in for its forward and its backward
    assert record["blocks"] == 1 and record["most_in_at_once"] == 1
    assert record["arrivals"] == 2 * micro_steps
    assert [e["loss"] for e in result.record["loss_history"]] == [e["loss"] for e in expected.record["loss_history"]]
    saved, reference = (_weights(r.run_dir, "transformer") for r in (result, expected))
    assert all(torch.equal(saved[name], reference[name]) for name in reference)


def test_block_swap_is_refused_for_unets_and_for_what_trains_whole(write_experiment, family_model, monkeypatch):
    monkeypatch.setattr(savers, "PARKING_DEVICE", "meta")
    with pytest.raises(ConfigError, match="sd1's denoiser is a UNet"):
        train_technique(load_experiment(write_experiment(techniques=LORA, block_swap=1)), "lora", progress=False)
    sd3 = load_experiment(write_experiment(techniques=FULL, model=family_model("sd3"), block_swap=1))
    with pytest.raises(ConfigError, match="trains every weight of the swapped blocks"):
        train_technique(sd3, "full", progress=False)


@pytest.mark.parametrize("name", ["full", "lora"])
def test_resume_with_8bit_adamw_equals_uninterrupted(name, write_experiment, tmp_path):
    """The 8-bit optimiser's quantised moments and their scales travel through the checkpoint whole."""
    import os
    import signal

    def stop_after_2(done):
        if done == 2:
            os.kill(os.getpid(), signal.SIGINT)

    path = write_experiment(max_train_steps=4, techniques={**FULL, **LORA}, optimizer="adamw8bit")
    first = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'a'}"]), name, progress=False)
    stopped = load_experiment(path, [f"output_dir={tmp_path / 'b'}"])
    assert train_technique(stopped, name, progress=False, after_step=stop_after_2).status == "interrupted"
    resumed = train_technique(stopped, name, progress=False, resume=True)
    assert resumed.status == "finished" and first.record["train"]["optimizer"] == "adamw8bit"
    a, b = _weights(first.run_dir, "unet"), _weights(resumed.run_dir, "unet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in first.record["loss_history"]] == [h["loss"] for h in resumed.record["loss_history"]]
