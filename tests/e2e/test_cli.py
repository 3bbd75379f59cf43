"""The command line: a thin layer whose errors are one line and whose help lists the choices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sdtune.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sdtune", *args], capture_output=True, text=True, env=ENV)


def test_help_lists_technique_kinds(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    from sdtune.techniques import TECHNIQUES

    assert f"technique kinds: {', '.join(TECHNIQUES.names())}" in " ".join(capsys.readouterr().out.split())
    assert "textual-inversion" in TECHNIQUES.names()


def test_bad_config_is_one_line_and_exit_2(write_experiment):
    path = write_experiment()
    result = _run("train", str(path), "--set", "train.batch_size=-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sdtune: error: train.batch_size: -1 is not allowed; expected a positive whole number"
    ]


def test_train_then_generate_end_to_end(write_experiment, tmp_path):
    path = write_experiment(max_train_steps=2)
    result = _run("train", str(path), "--technique", "lora", "--set", "train.log_every=1")
    assert result.returncode == 0, result.stderr
    assert "lora: finished at step 2/2" in result.stdout
    run_dir = tmp_path / "runs" / "lora"
    out = tmp_path / "samples"
    result = _run("generate", str(run_dir), "--prompt", "a red circle", "--num-images", "2", "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "model load:" in result.stdout and "per image:" in result.stdout
    assert len(list(out.glob("*.png"))) == 2
    again = _run("train", str(path), "--technique", "lora")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    missing = _run("generate", str(tmp_path / "nowhere"), "--prompt", "x")
    assert missing.returncode == 2 and "not an sdtune run folder" in missing.stderr


@pytest.mark.slow  # (default tier under 6 min: over 10 s on 2 cores)
def test_an_error_inside_a_techniques_own_process_is_one_line(write_experiment):
    """`sdtune train` with several techniques trains each in a child process; a bad option that only
    shows when the model is there (no layer matches) is still one line, printed once."""
    techniques = {"lora": {"kind": "lora"}, "zbad": {"kind": "partial", "modules": ["no_such_layer.*"]}}  # (sorted: lora first)
    result = _run("train", str(write_experiment(techniques=techniques, max_train_steps=1)), "--no-progress")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("sdtune")]
    assert lines == ["sdtune: error: partial: the patterns ['no_such_layer.*'] match no unet parameter"]
    assert "Traceback" not in result.stderr
    assert "lora: finished at step 1/1" in result.stdout
