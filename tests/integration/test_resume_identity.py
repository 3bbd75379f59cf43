"""A resumed run is the run it claims to be (issue #20 §1): every setting that shapes the run is
compared with what its checkpoint was written with; a difference is refused in one line naming
each key and its two values, before anything loads, and nothing in the run folder changes; the
settings that are safe to change are accepted and recorded; ``--resume`` with nothing to resume
says so and deletes nothing. (Integration tier: tiny LoRA runs of a few steps.)"""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdtune.errors import UserError
from sdtune.experiment import load_experiment
from sdtune.training import RunExistsError, train_technique
from sdtune.training.fingerprint import SAFE_AT_THE_SAME_TOTAL_BATCH, SAFE_ON_RESUME, compare
from sdtune.training.resume import ResumeMismatchError

TECHNIQUES = {"lora": {"kind": "lora", "rank": 2, "alpha": 2, "lr_scheduler": "constant"}}

# (the pure comparison) saved → current: which keys are refused, which accepted
BASE = {"train.learning_rate": 1e-4, "train.lr_scheduler": "constant", "train.log_every": 10, "train.batch_size": 2,
        "train.gradient_accumulation_steps": 2, "technique.r": 4, "data.rows": "abc", "run.max_steps": 6,
        "run.total_batch": 4, "run.num_processes": 1, "run.sharding": None, "data.num_workers": None}
COMPARISONS = [
    ({}, [], []),
    ({"train.learning_rate": 5e-4}, ["train.learning_rate"], []),
    ({"technique.r": 8}, ["technique.r"], []),
    ({"data.rows": "xyz"}, ["data.rows"], []),
    ({"train.log_every": 1, "data.num_workers": 2}, [], ["data.num_workers", "train.log_every"]),
    ({"run.max_steps": 9}, [], ["run.max_steps"]),  # constant schedule: the length may grow
    ({"run.max_steps": 9, "train.lr_scheduler": "cosine"}, ["run.max_steps", "train.lr_scheduler"], []),
    ({"run.max_steps": 2}, ["run.max_steps"], []),  # fewer steps than done (3)
    # another split of the same total batch: accepted; another total batch: refused with its parts
    ({"train.batch_size": 1, "run.num_processes": 2}, [], ["run.num_processes", "train.batch_size"]),
    ({"train.batch_size": 4, "run.total_batch": 8}, ["run.total_batch", "train.batch_size"], []),
    ({"run.sharding": "fsdp2", "run.num_processes": 2, "train.batch_size": 1}, [],
     ["run.num_processes", "run.sharding", "train.batch_size"]),
]


@pytest.mark.parametrize(("changed", "refused", "accepted"), COMPARISONS)
def test_compare_refuses_what_shapes_the_run_and_accepts_what_does_not(changed, refused, accepted):
    no, yes = compare(BASE, {**BASE, **changed}, steps_done=3)
    assert [c.key for c in no] == refused and [c.key for c in yes] == accepted
    assert all(c.before == BASE[c.key] and c.after == changed[c.key] for c in no + yes)
    assert not set(SAFE_ON_RESUME) & set(SAFE_AT_THE_SAME_TOTAL_BATCH)
    # a key one side lacks (an older checkpoint, the file checked before the run is set up): not compared
    assert compare({k: v for k, v in BASE.items() if k != "technique.r"}, {**BASE, "technique.r": 8}, 3) == ([], [])


def _stop_at(step):
    def hook(done):
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_model, tiny_data):
    """A LoRA run of 4 steps stopped (Ctrl-C) after step 2, with its checkpoint; the experiment file."""
    from conftest import experiment_dict

    root = tmp_path_factory.mktemp("resume-identity")
    raw = experiment_dict(tiny_model, tiny_data, max_train_steps=4, log_every=2)
    raw["techniques"], raw["output_dir"], raw["model"] = TECHNIQUES, str(root / "runs"), {"path": raw["model"]}
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = train_technique(load_experiment(path), "lora", progress=False, after_step=_stop_at(2))
    assert result.status == "interrupted" and (result.run_dir / "checkpoints" / "checkpoint-00000002").is_dir()
    return path, result.run_dir


def _folder_state(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


REFUSED = [  # --set on resume → the key named in the message with both values
    ("train.learning_rate=5.0e-4", "train.learning_rate 0.001 → 0.0005"),
    ("techniques.lora.rank=8", "technique.r 2 → 8"),
    ("techniques.lora.alpha=4", "technique.lora_alpha 2 → 4"),
    ("train.seed=1", "train.seed 0 → 1"),
    ("train.mixed_precision=bf16", 'train.mixed_precision "no" → "bf16"'),
    ("train.use_ema=true", "train.use_ema false → true"),
    ("techniques.lora.lr_scheduler=cosine", 'train.lr_scheduler "constant" → "cosine"'),
    ("train.noise_offset=0.1", "train.noise_offset 0.0 → 0.1"),
    ("data.resolution=64", "data.resolution 32 → 64"),
    ("data.random_flip=false", "data.random_flip true → false"),
    ("data.caption_prefix='sks, '", 'data.caption_prefix "" → "sks, "'),
    ("model.revision=main", "model.revision null → \"main\""),
    ("train.batch_size=4", "run.total_batch 4 → 8"),  # (found once the run is set up)
]


@pytest.mark.parametrize(("override", "named"), REFUSED, ids=[o.split("=")[0] for o, _ in REFUSED])
def test_a_setting_that_shapes_the_run_is_refused_on_resume(interrupted, override, named, tmp_path):
    path, stopped = interrupted
    run_dir = tmp_path / "runs" / "lora"
    shutil.copytree(stopped, run_dir)
    before = _folder_state(run_dir)
    with pytest.raises(ResumeMismatchError) as raised:
        train_technique(load_experiment(path, [override, f"output_dir={run_dir.parent}"]), "lora", resume=True, progress=False)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert named in message and "--overwrite" in message and "--output" in message
    assert _folder_state(run_dir) == before  # nothing written, nothing removed


def test_changed_captions_are_refused_on_resume(write_experiment, tiny_data, tmp_path):
    """The same data section and source, other captions: found from the rows' digest once the run is
    set up, before anything is written into the run folder."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    path = write_experiment(techniques=TECHNIQUES, data={"source": str(data)}, max_train_steps=2)
    stopped = train_technique(load_experiment(path), "lora", progress=False, after_step=_stop_at(1))
    assert stopped.status == "interrupted"
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace("a red", "a crimson"))
    before = _folder_state(stopped.run_dir)
    with pytest.raises(ResumeMismatchError, match=r'data\.rows "[0-9a-f]{32}" → "[0-9a-f]{32}"'):
        train_technique(load_experiment(path), "lora", resume=True, progress=False)
    assert _folder_state(stopped.run_dir) == before


def test_safe_changes_are_accepted_recorded_and_equal_a_run_started_with_them(interrupted, tmp_path):
    """log_every, checkpointing_steps, num_workers and a longer run (constant schedule) on resume: the
    record lists them, and the weights are an uninterrupted 6-step run's, bit for bit."""
    path, run_dir = interrupted
    copy = tmp_path / "runs"
    shutil.copytree(run_dir, copy / "lora")
    changes = ["train.log_every=1", "train.checkpointing_steps=5", "data.num_workers=0", "train.max_train_steps=6"]
    resumed = train_technique(load_experiment(path, [*changes, f"output_dir={copy}"]), "lora", resume=True, progress=False)
    straight = train_technique(
        load_experiment(path, ["train.max_train_steps=6", f"output_dir={tmp_path / 'straight'}"]), "lora", progress=False
    )
    assert resumed.status == "finished" and resumed.record["steps"] == {"done": 6, "max": 6}
    recorded = {c["key"]: (c["before"], c["after"], c["step"]) for c in resumed.record["changed_on_resume"]}
    assert recorded == {
        "train.log_every": (2, 1, 2), "train.checkpointing_steps": (None, 5, 2), "data.num_workers": (None, 0, 2),
        "run.max_steps": (4, 6, 2),
    }
    a, b = load_file(resumed.run_dir / "unet_adapter.safetensors"), load_file(straight.run_dir / "unet_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.record["loss_history"]] == [h["loss"] for h in straight.record["loss_history"]]


@pytest.mark.parametrize("leftover", ["logs", pytest.param(None, marks=pytest.mark.slow)])
def test_resume_with_nothing_to_resume_says_so_and_trains_from_step_0(write_experiment, tmp_path, capsys, leftover):
    experiment = load_experiment(write_experiment(techniques=TECHNIQUES, max_train_steps=1))
    run_dir = tmp_path / "runs" / "lora"
    if leftover:  # what a start that failed before its first checkpoint leaves
        (run_dir / leftover).mkdir(parents=True)
        (run_dir / leftover / "events.out.tfevents.1").write_text("x")
    result = train_technique(experiment, "lora", resume=True, progress=False)
    assert f"nothing to resume in {run_dir} (no checkpoint yet): training from step 0" in capsys.readouterr().out
    assert result.status == "finished" and not result.record["resumed_from"]
    assert not leftover or (run_dir / leftover / "events.out.tfevents.1").exists()  # kept


def test_resume_of_a_folder_with_work_and_no_checkpoint_deletes_nothing(write_experiment, tmp_path):
    experiment = load_experiment(write_experiment(techniques=TECHNIQUES, max_train_steps=1))
    run_dir = tmp_path / "runs" / "lora"
    (run_dir / "evaluation" / "step-000001").mkdir(parents=True)
    (run_dir / "evaluation" / "step-000001" / "000-a-seed0.png").write_bytes(b"png")
    before = _folder_state(run_dir)
    with pytest.raises(RunExistsError, match=r"nothing to resume in .*: it has no checkpoint but holds evaluation; pass --overwrite"):
        train_technique(experiment, "lora", resume=True, progress=False)
    assert _folder_state(run_dir) == before
