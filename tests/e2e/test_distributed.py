"""Several processes for real: 2 CPU processes (torchrun, gloo) form one group, train the same
thing as 1 process, write files once, stop together, resume across process counts, and split
evaluation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from sdtune.experiment import load_experiment
from sdtune.training import train_technique
from sdtune.util.distributed import DistributedSetupError, check_group

# Weights after 3 AdamW steps (lr 1e-3) on 1 and 2 processes: the same samples and random draws,
# summed in another order (DDP averages two half-batch gradients). Measured: LoRA ≤ 5e-7; full
# fine-tuning ≤ 3e-5 (Adam divides by √v, which magnifies float-order noise in near-zero gradients).
TOLERANCE = {"lora": 1e-5, "full": 1e-4}

STOP_RANK_1_AT_STEP_2 = """
import os
import signal

import sdtune.runner.runs as train_module

real = train_module.train_technique


def stopping(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        kwargs["after_step"] = lambda done: done == 2 and os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)


train_module.train_technique = stopping
"""


def _torchrun(*args, processes=2, extra_env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "sdtune", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _weights(run_dir, name):
    path = run_dir / ("unet/diffusion_pytorch_model.safetensors" if name == "full" else "unet_adapter.safetensors")
    return load_file(path)


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_two_processes_train_what_one_process_trains(name, write_experiment, tmp_path):
    path = write_experiment(data={"cache": "memory"}, log_every=1)
    two = _torchrun("train", str(path), "--technique", name, "--output", str(tmp_path / "two"), "--no-progress")
    assert two.returncode == 0, two.stderr[-3000:]
    record = json.loads((tmp_path / "two" / name / "record.json").read_text())
    assert record["num_processes"] == 2 and record["status"] == "finished"
    events = list((tmp_path / "two" / name / "logs").rglob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1  # written by one process (its pid)
    assert two.stdout.count(f"{name}: finished") == 1  # one result line: rank 0 reports
    # total batch 8 = 2 processes × batch 2 × accumulation 2 = 1 process × batch 4 × 2 = 1 process × 1 × 8
    one = train_technique(load_experiment(path, ["train.batch_size=4", f"output_dir={tmp_path / 'one'}"]), name, progress=False)
    accumulated = train_technique(
        load_experiment(path, ["train.gradient_accumulation_steps=8", "train.batch_size=1", f"output_dir={tmp_path / 'acc'}"]),
        name, progress=False,
    )
    reference = _weights(tmp_path / "two" / name, name)
    assert _max_difference(reference, _weights(one.run_dir, name)) <= TOLERANCE[name]
    assert _max_difference(reference, _weights(accumulated.run_dir, name)) <= TOLERANCE[name]
    losses = [h["loss"] for h in record["loss_history"]]
    assert np.allclose(losses, [h["loss"] for h in one.record["loss_history"]], rtol=1e-5)


@pytest.mark.slow
def test_a_stop_on_one_rank_stops_both_and_resumes_on_one_process(write_experiment, tmp_path):
    path = write_experiment(data={"cache": "memory"}, log_every=1, max_train_steps=4)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(STOP_RANK_1_AT_STEP_2)
    stopped = _torchrun("train", str(path), "--technique", "lora", "--output", str(tmp_path / "runs"), "--no-progress",
                        extra_env={"PYTHONPATH": str(inject)})
    assert stopped.returncode == 0, stopped.stderr[-3000:]  # both ranks stopped cleanly: no failure for the launcher
    record = json.loads((tmp_path / "runs" / "lora" / "record.json").read_text())
    assert record["status"] == "interrupted" and record["steps"]["done"] == 2
    assert (tmp_path / "runs" / "lora" / "checkpoints" / "checkpoint-00000002").is_dir()
    # resume the 2-process run (2 × 2 × 2) on 1 process with the same total batch (8 = 4 × 2)
    resumed = train_technique(load_experiment(path, ["train.batch_size=4"]), "lora", tmp_path / "runs", resume=True, progress=False)
    straight = train_technique(load_experiment(path, ["train.batch_size=4", f"output_dir={tmp_path / 'straight'}"]), "lora", progress=False)
    assert resumed.status == "finished" and resumed.record["resumed_from"]
    assert _max_difference(_weights(resumed.run_dir, "lora"), _weights(straight.run_dir, "lora")) <= TOLERANCE["lora"]


@pytest.mark.slow
def test_evaluation_split_over_two_processes_gives_the_same_images(write_experiment, tiny_clip_dir, tmp_path):
    path = write_experiment(techniques={"lora": {"kind": "lora"}}, max_train_steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {"prompts": ["a red circle", "a blue square"], "seeds_per_prompt": 3, "num_inference_steps": 2,
                         "guidance_scale": 3.0, "clip_model": str(tiny_clip_dir), "metrics": ["clip_score"]}
    path.write_text(yaml.safe_dump(raw))
    one = subprocess.run([sys.executable, "-m", "sdtune", "compare", str(path), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    shutil.copytree(tmp_path / "out" / "images", tmp_path / "images-one")
    # the same comparison (its finished training runs reused) evaluated by 2 processes
    two = _torchrun("compare", str(path), "--output", str(tmp_path / "out"))
    assert two.returncode == 0, two.stderr[-3000:]
    for label in ("base", "lora-seed0"):
        a = sorted((tmp_path / "images-one" / label).glob("*.png"))
        b = sorted((tmp_path / "out" / "images" / label).glob("*.png"))
        assert [p.name for p in a] == [p.name for p in b] and len(a) == 6
        for x, y in zip(a, b):
            assert np.array_equal(np.asarray(_open(x)), np.asarray(_open(y))), x.name
    evaluation = json.loads((tmp_path / "out" / "records" / "eval-lora-seed0.json").read_text())
    assert evaluation["generation"]["processes"] == 2 and len(evaluation["generation"]["latencies_s"]) == 6
    assert (tmp_path / "out" / "report.html").exists()


def _open(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_launched_processes_that_form_no_group_are_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedSetupError, match="2 processes were launched but they formed a group of 1"):
        check_group(1)
    check_group(2)
    monkeypatch.delenv("WORLD_SIZE")
    check_group(1)


def test_resume_with_another_total_batch_is_refused(write_experiment, tmp_path):
    from sdtune.training.checkpoint import CheckpointError

    path = write_experiment(max_train_steps=4, checkpointing_steps=2)
    train_technique(load_experiment(path), "lora", progress=False)
    folder = tmp_path / "runs" / "lora"
    (folder / "record.json").unlink()  # pretend it stopped after the checkpoint at step 2
    with pytest.raises(CheckpointError, match="total_batch 4 → 8"):
        train_technique(load_experiment(path, ["train.batch_size=4"]), "lora", resume=True, progress=False)
