"""Writes that fail leave the last good state (issue #20 §2).

Every writer of :mod:`sdtune.util.atomic` under every environmental cause (a full disk, a file-size
limit, a quota, no permission, a read-only file system): one line naming the path and the cause,
the previous file as it was, no temporary file left; a bug keeps its traceback. Then training: a
failed checkpoint keeps the previous one, a failed final save keeps the final state, and
``--resume`` finishes the run equal to an uninterrupted one, tensor for tensor — in-process with
an injected fault (integration tier), and through the CLI under a real ``RLIMIT_FSIZE`` (slow).
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from sdtune.errors import UserError
from sdtune.experiment import load_experiment
from sdtune.training import train_technique
from sdtune.util import atomic

CAUSES = {  # errno → what the one line says
    errno.ENOSPC: "No space left on device",
    errno.EFBIG: "File too large",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EACCES: "Permission denied",
    errno.EROFS: "Read-only file system",
}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    axis.plot([0, 1])
    return figure


WRITERS = {  # name → (write into path, read back)
    "text": (lambda path: atomic.write_text(path, "new"), lambda path: path.read_text()),
    "json": (lambda path: atomic.write_json(path, {"new": 1}), lambda path: path.read_text()),
    "bytes": (lambda path: atomic.write_bytes(path, b"new"), lambda path: path.read_bytes()),
    "tensors": (lambda path: atomic.save_tensors(path, {"x": torch.ones(4)}), lambda path: path.read_bytes()),
    "image": (lambda path: atomic.save_image(path, Image.new("RGB", (4, 4))), lambda path: path.read_bytes()),
    "figure": (lambda path: atomic.save_figure(path, _figure()), lambda path: path.read_bytes()),
}


def _failing(code, monkeypatch):
    """Every write below fails with ``code`` once its file is half written (the bytes before it landed)."""
    real = os.replace

    def replace(source, target):  # (the last step of every write: as if the data never fit)
        if ".tmp" in str(source):
            raise OSError(code, os.strerror(code), str(target))
        return real(source, target)

    monkeypatch.setattr(atomic.os, "replace", replace)


@pytest.mark.parametrize("code", list(CAUSES), ids=[errno.errorcode[c] for c in CAUSES])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_failed_write_is_one_line_and_keeps_the_previous_file(writer, code, tmp_path, monkeypatch):
    write, read = WRITERS[writer]
    path = tmp_path / "out" / "target"
    path.parent.mkdir()
    path.write_bytes(b"the last good state")
    _failing(code, monkeypatch)
    with pytest.raises(atomic.WriteError) as raised:
        write(path)
    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert message.startswith(f"cannot write {path}: {CAUSES[code]} (")
    assert path.read_bytes() == b"the last good state" and sorted(path.parent.iterdir()) == [path]


@pytest.mark.parametrize("code", list(CAUSES), ids=[errno.errorcode[c] for c in CAUSES])
def test_a_failed_folder_write_keeps_the_previous_folder(code, tmp_path):
    """``replacing(folder=True)`` and ``filling``: a writer failing half-way (a library's own error,
    safetensors' Rust one included) leaves the old folder whole and no temporary folder."""
    from safetensors import SafetensorError

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "weights").write_text("old")
    errors = [OSError(code, os.strerror(code)), SafetensorError(f"Error while serializing: I/O error: x (os error {code})")]
    for error in errors:
        for mechanism in (lambda: atomic.replacing(folder, folder=True), lambda: atomic.filling(folder)):
            with pytest.raises(atomic.WriteError, match=f"cannot write {folder}: {CAUSES[code]}"):
                with mechanism() as temporary:
                    (temporary / "weights").write_text("new, half written")
                    raise error
            assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (folder / "weights").read_text() == "old"


def test_a_real_file_size_limit_is_reported_and_a_bug_keeps_its_traceback(tmp_path):
    path = tmp_path / "big.safetensors"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # (Python ignores SIGXFSZ: the write gets EFBIG)
    try:
        with pytest.raises(atomic.WriteError, match="File too large"):
            atomic.save_tensors(path, {"x": torch.zeros(10_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError):  # not the environment's: no WriteError, the traceback stays
        atomic.write_with(tmp_path / "x", lambda temporary: temporary.write_text(3))
    with pytest.raises(FileNotFoundError):
        atomic.write_with(tmp_path / "y", lambda temporary: open(tmp_path / "missing" / "z"))
    assert list(tmp_path.iterdir()) == []


# -- training ---------------------------------------------------------------------------------------
def _weights(run_dir, name):
    return load_file(run_dir / ("unet/diffusion_pytorch_model.safetensors" if name == "full" else "unet_adapter.safetensors"))


def _assert_equal_runs(a, b, name):
    first, second = _weights(a.run_dir, name), _weights(b.run_dir, name)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert [h["loss"] for h in a.record["loss_history"]] == [h["loss"] for h in b.record["loss_history"]]


TECHNIQUES = {
    "full": {"kind": "full", "use_ema": True, "ema_decay": 0.9},
    "lora": {"kind": "lora", "rank": 2, "lr_scheduler": "cosine"},
}


@pytest.mark.parametrize("name", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_a_failed_checkpoint_keeps_the_last_good_one_and_resume_finishes_the_run(name, write_experiment, tmp_path, monkeypatch):
    path = write_experiment(techniques=TECHNIQUES, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=1)
    straight = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'straight'}"]), name, progress=False)
    import sdtune.training.checkpoint as checkpoint

    real, calls = checkpoint.save_file, []

    def disk_full_at_the_second_checkpoint(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 2:  # (two files per checkpoint)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_at_the_second_checkpoint)
    experiment = load_experiment(path)
    with pytest.raises(atomic.WriteError, match=r"checkpoint-00000002: No space left on device"):
        train_technique(experiment, name, progress=False)
    monkeypatch.setattr(checkpoint, "save_file", real)
    run_dir = tmp_path / "runs" / name
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-00000001"]  # not rotated away
    resumed = train_technique(experiment, name, progress=False, resume=True)
    assert resumed.status == "finished" and resumed.record["resumed_from"][0].endswith("checkpoint-00000001")
    _assert_equal_runs(resumed, straight, name)


@pytest.mark.parametrize("name", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_a_failed_final_save_keeps_the_final_state_and_resume_writes_the_outputs(name, write_experiment, tmp_path, monkeypatch):
    path = write_experiment(techniques=TECHNIQUES, max_train_steps=3)
    straight = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'straight'}"]), name, progress=False)
    technique = type(load_experiment(path).techniques[name].build())
    real = technique.save

    def quota_exceeded_half_way(self, model, out_dir):
        real(self, model, out_dir)  # every file written, then the last one fails
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(technique, "save", quota_exceeded_half_way)
    experiment = load_experiment(path)
    with pytest.raises(atomic.WriteError) as raised:
        train_technique(experiment, name, progress=False)
    run_dir = tmp_path / "runs" / name
    assert str(raised.value).startswith(f"cannot write {run_dir}: Disk quota exceeded")
    assert "checkpoint-00000003: fix that, then rerun with --resume" in str(raised.value)
    # the final state is kept; no output, no record, no temporary folder
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "logs", "progress.json"]  # (live status)
    assert sorted(p.name for p in run_dir.parent.iterdir() if p.name != ".cache") == [name]  # (.cache: latents)
    monkeypatch.setattr(technique, "save", real)
    resumed = train_technique(experiment, name, progress=False, resume=True)
    assert resumed.status == "finished" and resumed.record["steps"]["done"] == 3
    assert not (run_dir / "checkpoints" / "checkpoint-00000003").exists()  # the outputs hold it now
    _assert_equal_runs(resumed, straight, name)
    # the trained check's evidence came through the final state: the same verdict as the straight run
    check, expected = resumed.record["checks"]["trained"], straight.record["checks"]["trained"]
    assert check["passed"] and check["checked"] == expected["checked"], check["failures"]
    assert check["gradient_watch_steps"] == expected["gradient_watch_steps"]


# -- the command line, under a real file-size limit (slow) -------------------------------------------
@pytest.fixture(scope="module")
def large_vae_model(tmp_path_factory):
    """The tiny SD model with a VAE file larger than any checkpoint file of its full fine-tuning, so a
    file-size limit between the two fails the final save and not the final state."""
    from conftest import WORDS

    from sdtune.testing.tiny import TinySizes, build_tiny_pipeline

    folder = tmp_path_factory.mktemp("large-vae")
    build_tiny_pipeline(folder, words=WORDS, sizes=TinySizes(vae_channels=(32, 64)))
    return folder


def _sdtune_limited(limit, *args):
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    command = [sys.executable, "-m", "sdtune", *args, "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, preexec_fn=limited if limit else None,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["final save", "checkpoint"])
def test_resume_after_a_file_size_limit_equals_an_uninterrupted_run(fault, large_vae_model, tiny_data, tmp_path):
    from conftest import experiment_dict

    raw = experiment_dict(large_vae_model, tiny_data, max_train_steps=4, checkpointing_steps=2)
    raw["techniques"] = {"full": {"kind": "full"}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    straight = _sdtune_limited(None, "train", str(path), "--output", str(tmp_path / "straight"))  # (the same threads)
    assert straight.returncode == 0, straight.stderr[-3000:]
    unet = (large_vae_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    vae = (large_vae_model / "vae" / "diffusion_pytorch_model.safetensors").stat().st_size
    # a checkpoint's largest file holds AdamW's two moments (2 × the UNet); the VAE file is larger
    limit = {"final save": int(2.6 * unet), "checkpoint": int(1.5 * unet)}[fault]
    assert 2.2 * unet < vae and limit < vae
    output = tmp_path / "runs"
    failed = _sdtune_limited(limit, "train", str(path), "--output", str(output))
    run_dir = output / "full"
    cause = "File too large"
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("sdtune: error:")]
    assert len(errors) == 1 and cause in errors[0], failed.stderr[-3000:]
    if fault == "final save":
        assert f"cannot write {run_dir}: {cause}" in errors[0] and "rerun with --resume" in errors[0]
        assert (run_dir / "checkpoints" / "checkpoint-00000004").is_dir() and not (run_dir / "record.json").exists()
    else:
        assert f"checkpoint-00000002: {cause}" in errors[0]
        # a new run with no checkpoint is removed whole (docs/resume.md): the same command can run again
        assert not run_dir.exists()
    assert not [p for p in output.rglob(".*") if p.name not in (".cache",)]  # no temporary file left
    resumed = _sdtune_limited(None, "train", str(path), "--output", str(output), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = yaml.safe_load((run_dir / "record.json").read_text())
    assert record["status"] == "finished" and record["steps"]["done"] == 4
    a, b = _weights(run_dir, "full"), _weights(tmp_path / "straight" / "full", "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    uninterrupted = yaml.safe_load((tmp_path / "straight" / "full" / "record.json").read_text())
    assert [h["loss"] for h in record["loss_history"]] == [h["loss"] for h in uninterrupted["loss_history"]]
