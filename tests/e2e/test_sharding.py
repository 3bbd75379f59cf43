"""FSDP2 (and DeepSpeed ZeRO-2 in fp32 and bf16, and ZeRO-3: slow tier, where deepspeed is installed)
for real on 2 CPU processes (torchrun, gloo): full fine-tuning with EMA and LoRA train sharded, match
one process, write the same files, checkpoint, and resume to the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import TOLERANCE, _max_difference, _torchrun, _weights

from sdtune.config import TrainConfig
from sdtune.experiment import load_experiment
from sdtune.training import train_technique
from sdtune.training.checkpoint import split_tensors
from sdtune.training.sharding import (
    Routed,
    ShardingError,
    TrainedComponents,
    configure,
    full_optimizer_state,
    full_parameters,
    load_training_state,
    unrouted,
)

# what `accelerate launch` sets from an FSDP2 config (accelerate config → fsdp_config)
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
ZERO2_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
ZERO3_ENV = {**ZERO2_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
# resumed vs uninterrupted sharded run: the same shards, the same reduction order. Measured: equal.
RESUME_TOLERANCE = 1e-6
# bf16 DeepSpeed vs one bf16 process: mean |difference| / mean |update| (see _close_to_one_process)
BF16_RELATIVE = 0.15


@pytest.mark.slow  # (default tier under 6 min: over 10 s on 2 cores)
def test_fsdp2_on_two_cpu_processes_trains_checkpoints_and_resumes(write_experiment, tmp_path):
    _train_sharded_match_one_process_and_resume(write_experiment, tmp_path, FSDP2_ENV, "fsdp2")


@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_processes_trains_checkpoints_and_resumes(write_experiment, tmp_path):
    _train_sharded_match_one_process_and_resume(write_experiment, tmp_path, ZERO2_ENV, "deepspeed")


@pytest.mark.slow
def test_deepspeed_zero2_bf16_on_two_cpu_processes_trains_checkpoints_and_resumes(write_experiment, tmp_path):
    """DeepSpeed's bf16 engine (bf16 weights, fp32 master copy): saved files and EMA in fp32."""
    _train_sharded_match_one_process_and_resume(write_experiment, tmp_path, ZERO2_ENV, "deepspeed", "bf16")


@pytest.mark.slow
def test_deepspeed_zero3_on_two_cpu_processes_trains_checkpoints_and_resumes(write_experiment, tmp_path):
    """ZeRO-3 partitions the weights too (it hung before: rank 0 alone reloaded a model to save it,
    which transformers built under deepspeed.zero.Init, a collective)."""
    _train_sharded_match_one_process_and_resume(write_experiment, tmp_path, ZERO3_ENV, "deepspeed")


def _trained(run_dir, name):
    """The saved trained tensors: full fine-tuning's UNet; LoRA's UNet and text-encoder adapters."""
    if name == "full":
        return _weights(run_dir, name)
    return {f"{part}.{key}": value for part in ("unet", "text_encoder")
            for key, value in load_file(run_dir / f"{part}_adapter.safetensors").items()}


def _close_to_one_process(sharded, single, name, mixed_precision, model_dir):
    """fp32: within the 1-vs-2-process tolerance. bf16: DeepSpeed computes with bf16 weights, one
    process with fp32 weights under bf16 autocast, so single elements differ by about an Adam step
    (near-zero gradients change sign): the mean difference is bounded relative to the mean update
    (full: from the base weights; LoRA: its B matrices, which start at zero). Measured: 0.04, 0.004."""
    if mixed_precision == "no":
        return _max_difference(sharded, single) <= TOLERANCE[name]
    base = load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors") if name == "full" else {
        k: torch.zeros_like(v) for k, v in single.items()
    }
    keys = [k for k in single if name == "full" or "lora_B" in k]
    difference = sum(float((sharded[k] - single[k]).abs().sum()) for k in keys)
    update = sum(float((single[k] - base[k]).abs().sum()) for k in keys)
    return all(t.dtype == torch.float32 for t in sharded.values()) and difference <= BF16_RELATIVE * update


def _train_sharded_match_one_process_and_resume(write_experiment, tmp_path, environment, sharding, mixed_precision="no"):
    """One launch trains full+EMA (one model) and LoRA of the UNet and the text encoder (two models,
    prepared as one container) sharded, with a checkpoint at step 2 of 4; one process trains the same
    total batch, and resumes the sharded checkpoints; a second launch resumes both from step 2."""
    techniques = {"full": {"kind": "full", "use_ema": True, "ema_decay": 0.9, "lr_scheduler": "constant"},
                  "lora": {"kind": "lora", "rank": 4, "alpha": 8, "lr_scheduler": "cosine", "train_text_encoder": True}}
    path = write_experiment(
        techniques, data={"cache": "memory"}, log_every=1, max_train_steps=4, checkpointing_steps=2,
        mixed_precision=mixed_precision,
    )
    model_dir = Path(load_experiment(path).model.path)
    sharded = tmp_path / "sharded"
    run = _torchrun("train", str(path), "--output", str(sharded), "--no-progress", extra_env=environment)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("full", "lora"):
        record = json.loads((sharded / name / "record.json").read_text())
        assert (record["status"], record["num_processes"], record["sharding"]) == ("finished", 2, sharding)
        assert (sharded / name / "checkpoints" / "checkpoint-00000002" / "trainable.safetensors").is_file()
    # the same files as one process (total batch 8 = 2 × 2 × 2 = 1 × 4 × 2), the same weights
    one = tmp_path / "one"
    for name in ("full", "lora"):
        single = train_technique(load_experiment(path, ["train.batch_size=4", f"output_dir={one}"]), name, progress=False)
        assert sorted(p.name for p in single.run_dir.iterdir() if p.is_file()) == sorted(
            p.name for p in (sharded / name).iterdir() if p.is_file()
        )
        assert _close_to_one_process(_trained(sharded / name, name), _trained(single.run_dir, name), name, mixed_precision, model_dir)
    # resume both sharded runs from their step-2 checkpoints (whole tensors put back into the shards)
    resumed, unsharded = tmp_path / "resumed", tmp_path / "unsharded"
    shutil.copytree(sharded, resumed)
    for name in ("full", "lora"):
        shutil.rmtree(resumed / name / "checkpoints" / "checkpoint-00000004", ignore_errors=True)
        (resumed / name / "record.json").unlink()
    shutil.copytree(resumed, unsharded)
    for name in ("full", "lora"):  # the sharded checkpoint resumed by one process: the layout is the same
        finished = train_technique(load_experiment(path, ["train.batch_size=4"]), name, unsharded, resume=True, progress=False)
        assert finished.record["resumed_from"] and finished.record["sharding"] is None
        assert _close_to_one_process(_trained(unsharded / name, name), _trained(one / name, name), name, mixed_precision, model_dir)
    again = _torchrun("train", str(path), "--output", str(resumed), "--no-progress", "--resume", extra_env=environment)
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("full", "lora"):
        record = json.loads((resumed / name / "record.json").read_text())
        assert record["status"] == "finished" and record["resumed_from"] and record["sharding"] == sharding
        assert record["steps"]["done"] == 4 and [h["step"] for h in record["loss_history"]] == [1, 2, 3, 4]
        assert _max_difference(_trained(resumed / name, name), _trained(sharded / name, name)) <= RESUME_TOLERANCE


@pytest.mark.parametrize(
    ("environment", "options", "message"),
    [
        (ZERO2_ENV, {"optimizer": "adamw8bit"}, "train.optimizer: 'adamw8bit' is not supported with DeepSpeed"),
        ({**FSDP2_ENV, "FSDP_VERSION": "1"}, {}, "FSDP1 is not supported"),
        (FSDP2_ENV, {"compile": True}, "train.compile: true is not supported with FSDP2"),
    ],
)
def test_sharded_setups_that_cannot_run_are_refused_in_one_line(environment, options, message, monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    AcceleratorState._reset_state()  # (as sdtune does before each Accelerator)
    accelerator = Accelerator(cpu=True)
    for key, value in environment.items():  # the launcher's variables, set after the one-process accelerator
        monkeypatch.setenv(key, value)
    # the state accelerate gives a 2-process FSDP launch on GPUs (undone after the test)
    plugin = FullyShardedDataParallelPlugin() if "FSDP_VERSION" in environment else None
    monkeypatch.setattr(accelerator.state, "distributed_type", DistributedType.FSDP)
    monkeypatch.setattr(accelerator.state, "num_processes", 2)
    monkeypatch.setattr(accelerator.state, "fsdp_plugin", plugin, raising=False)
    config = TrainConfig(max_train_steps=1, **options)
    with pytest.raises(ShardingError, match=message):
        configure(accelerator, config)


def test_components_prepared_as_one_container_are_called_through_it():
    """FSDP2/DeepSpeed prepare one model: the model calls each trained component through the
    container's forward (where FSDP2's unshard and DeepSpeed's engine run); the rest is its own."""
    calls = []
    unet, text_encoder = torch.nn.Linear(3, 2), torch.nn.Linear(3, 4)
    container = TrainedComponents({"unet": unet, "text_encoder": text_encoder})
    container.register_forward_pre_hook(lambda module, args: calls.append(args[0]))
    routed = Routed(container, container["text_encoder"], "text_encoder")
    inputs = torch.ones(1, 3)
    assert torch.equal(routed(inputs), text_encoder(inputs)) and calls == ["text_encoder"]
    assert routed.weight is text_encoder.weight and routed.out_features == 4
    assert unrouted(routed) is text_encoder and unrouted(unet) is unet


def _components_and_optimizer(seed):
    """Two trained components (one with a frozen tensor), AdamW with a param group each."""
    torch.manual_seed(seed)
    components = {"unet": torch.nn.Linear(3, 2), "text_encoder": torch.nn.Linear(3, 4)}
    components["text_encoder"].bias.requires_grad_(False)
    parameters = {f"{c}.{n}": p for c, m in components.items() for n, p in m.named_parameters() if p.requires_grad}
    groups = [["unet.weight", "unet.bias"], ["text_encoder.weight"]]
    rates = (0.1, 0.01)
    optimizer = torch.optim.AdamW([{"params": [parameters[n] for n in names], "lr": lr} for names, lr in zip(groups, rates)])
    return components, parameters, groups, optimizer


def _same(a, b):
    """Equal nested states as a checkpoint stores them: the same JSON text and equal tensors."""
    (structure_a, tensors_a), (structure_b, tensors_b) = split_tensors(a), split_tensors(b)
    return json.dumps(structure_a) == json.dumps(structure_b) and tensors_a.keys() == tensors_b.keys() and all(
        torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a
    )


def test_trained_state_gathered_and_put_back_through_torch_state_dict_api_on_one_process():
    """One process (no group): the checkpoint's trained tensors are the trained parameters by
    <component>.<parameter> (frozen ones left out), its optimizer state is torch's own index layout,
    and putting both into a fresh model and optimizer restores them exactly; a trained tensor that never
    had a gradient keeps no Adam state (as torch keeps none)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    components, parameters, groups, optimizer = _components_and_optimizer(seed=0)
    for _ in range(2):
        components["unet"](torch.ones(1, 3)).square().sum().backward()  # the text encoder gets no gradient
        optimizer.step()
    trainable = full_parameters(accelerator, components, parameters)
    saved = full_optimizer_state(accelerator, components, parameters, optimizer, groups)
    assert list(trainable) == list(parameters) and all(torch.equal(trainable[n], parameters[n]) for n in parameters)
    assert sorted(saved["state"]) == [0, 1] and [g["params"] for g in saved["param_groups"]] == [[0, 1], [2]]
    assert _same(saved, optimizer.state_dict())
    fresh_components, fresh, _, fresh_optimizer = _components_and_optimizer(seed=1)
    load_training_state(accelerator, fresh_components, fresh, fresh_optimizer, trainable, saved, groups)
    assert all(torch.equal(fresh[n], parameters[n]) for n in parameters)
    assert not torch.equal(fresh_components["text_encoder"].bias, components["text_encoder"].bias)  # frozen: untouched
    assert _same(fresh_optimizer.state_dict(), optimizer.state_dict())
