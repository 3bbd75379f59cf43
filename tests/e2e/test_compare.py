"""`sdtune compare` end to end on the tiny model: records, report, re-rendering, failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from sdtune.comparison import compare
from sdtune.experiment import load_experiment
from sdtune.report.render import render_report


@pytest.fixture
def compare_experiment(write_experiment, tiny_clip_dir):
    def write(**extra):
        path = write_experiment(max_train_steps=2)
        raw = yaml.safe_load(path.read_text())
        raw["evaluation"] = {
            "prompts": ["a red circle"], "out_of_domain_prompts": ["yoda"], "seeds_per_prompt": 2,
            "num_inference_steps": 2, "guidance_scale": 3.0, "clip_model": str(tiny_clip_dir),
            "max_reference_images": 6, **extra,
        }
        path.write_text(yaml.safe_dump(raw))
        return load_experiment(path)

    return write


@pytest.mark.slow  # (default tier under 6 min: over 10 s on 2 cores)
def test_compare_two_techniques_two_seeds(compare_experiment, tmp_path):
    experiment = compare_experiment()
    report = compare(experiment, seeds=[0, 1], progress=False)
    root = report.parent
    names = sorted(p.name for p in (root / "records").glob("*.json"))
    assert names == [
        "eval-base.json", "eval-full-seed0.json", "eval-full-seed1.json", "eval-lora-seed0.json",
        "eval-lora-seed1.json", "train-full-seed0.json", "train-full-seed1.json", "train-lora-seed0.json",
        "train-lora-seed1.json",
    ]
    lora0 = json.loads((root / "records" / "train-lora-seed0.json").read_text())
    lora1 = json.loads((root / "records" / "train-lora-seed1.json").read_text())
    assert lora0["seeds"]["train"] == 0 and lora1["seeds"]["train"] == 1
    assert lora0["loss_history"] != lora1["loss_history"]  # different seeds, different runs
    evaluation = json.loads((root / "records" / "eval-lora-seed0.json").read_text())
    assert len(evaluation["images"]) == 4 and all((root / e["path"]).exists() for e in evaluation["images"])
    metrics = evaluation["metrics"]
    for name in ("clip_score", "fidelity", "diversity", "preservation", "fid", "kid"):
        assert metrics[name]["skipped"] is None and isinstance(metrics[name]["value"], float), name
    assert abs(sum(metrics["style_split"]["value"].values()) - 1) < 1e-6
    markdown = (root / "report.md").read_text()
    # the measured numbers are in the tables
    seconds = f"{lora0['timing']['s_per_step']:.3g}"
    assert "| lora | lora | finished |" in markdown and "clip_score" in markdown
    assert seconds in markdown or f"{(lora0['timing']['s_per_step'] + lora1['timing']['s_per_step']) / 2:.3g}" in markdown
    html = report.read_text()
    # 4 figures, and 3 of "What each technique changed" (heat map, ranks, change against preservation)
    assert html.count("data:image/png;base64,") == 7 and "<script" not in html
    assert "## What each technique changed" in markdown and "| lora | passed |" in markdown
    # re-rendering from the records alone gives the same report (before the browser check, which
    # skips on a machine without Chromium)
    (root / "report.md").unlink()
    render_report(root)
    assert (root / "report.md").read_text() == markdown
    _open_in_chromium(report, expected_images=7)


CRASHING_FULL = """
import pathlib
import shutil
import time

import sdtune.runner.runs as train_module

real = train_module.train_technique


def snapshot_live_page(output_dir):
    # after lora's first step: wait for the parent's live page to show it running, and keep a copy
    page, deadline = pathlib.Path(output_dir) / "report.html", time.monotonic() + 30
    while time.monotonic() < deadline:
        if "running at step 0 of 2" in page.read_text():
            shutil.copy(page, pathlib.Path(output_dir) / "live-snapshot.html")
            return
        time.sleep(0.2)


def crashing(experiment, name, output_dir, *args, **kwargs):
    if name == "full":
        raise RuntimeError("CUDA out of memory (simulated)")
    kwargs["after_step"] = lambda done: done == 1 and snapshot_live_page(output_dir)
    return real(experiment, name, output_dir, *args, **kwargs)


train_module.train_technique = crashing
"""


@pytest.mark.slow
def test_failed_technique_keeps_others_and_is_marked(compare_experiment, monkeypatch, tmp_path):
    """Each technique trains in its own process: a crash there (injected into the child through
    sitecustomize) is recorded with its traceback, and the others go on. While lora trains, the
    parent's live report.html already says so (from lora's progress.json) and gives full's one-line
    reason; it reloads itself until the final report replaces it."""
    experiment = compare_experiment(metrics=["clip_score"])
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(CRASHING_FULL)
    original = os.environ.get("PYTHONPATH")  # kept after the injection: it may be what makes sdtune importable
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path / "inject"), original) if p))
    report = compare(experiment, progress=False)
    markdown = (report.parent / "report.md").read_text()
    assert "| full | full | failed |" in markdown and "CUDA out of memory (simulated)" in markdown
    failed = json.loads((report.parent / "records" / "train-full-seed0.json").read_text())
    assert "Traceback" in failed["traceback"] and "crashing" in (report.parent / "full" / "error.log").read_text()
    assert (report.parent / "records" / "eval-lora-seed0.json").exists()
    live = (report.parent / "live-snapshot.html").read_text()
    assert "<td>full</td><td>failed: CUDA out of memory (simulated)</td>" in live
    assert "<td>lora</td><td>running at step 0 of 2</td>" in live and "http-equiv='refresh'" in live
    assert "<td>full</td><td>full</td><td>failed</td>" in live  # the partial table, from full's record
    assert "http-equiv='refresh'" not in report.read_text() and "Quality metrics" in report.read_text()
    progress = json.loads((report.parent / "lora" / "progress.json").read_text())
    assert (progress["step"], progress["max_steps"], progress["state"]) == (2, 2, "finished")
    # a second run retries only the failed technique; lora's finished record is reused
    monkeypatch.setenv("PYTHONPATH", original) if original else monkeypatch.delenv("PYTHONPATH")
    lora_before = (report.parent / "lora" / "record.json").read_text()
    compare(experiment, progress=False)
    assert (report.parent / "lora" / "record.json").read_text() == lora_before
    assert "| full | full | finished |" in (report.parent / "report.md").read_text()


@pytest.mark.slow  # (default tier under 6 min: over 10 s on 2 cores)
def test_a_bad_technique_option_is_a_failed_row_with_its_one_line_reason(compare_experiment, write_experiment):
    experiment = compare_experiment(metrics=["clip_score"])
    from sdtune.experiment import experiment_from_dict

    raw = experiment.to_dict()
    raw["techniques"]["full"] = {"kind": "partial", "modules": ["no_such_layer.*"]}
    report = compare(experiment_from_dict(raw), progress=False)
    failed = json.loads((report.parent / "records" / "train-full-seed0.json").read_text())
    assert failed["status"] == "failed" and "match no unet parameter" in failed["error"]
    assert failed["traceback"] is None  # a user error, not a bug


def test_missing_clip_model_skips_clip_metrics_with_a_reason(compare_experiment, tmp_path):
    experiment = compare_experiment(clip_model=str(tmp_path / "no-clip-here"), metrics=["clip_score", "fid"])
    report = compare(experiment, only="lora", progress=False)
    evaluation = json.loads((report.parent / "records" / "eval-lora-seed0.json").read_text())
    assert "could not be loaded" in evaluation["metrics"]["clip_score"]["skipped"]
    assert "Skipped: clip_score:" in (report.parent / "report.md").read_text()


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]


def _open_in_chromium(report, expected_images):
    """The HTML report opens in a real browser with no console messages and all figures decoded."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert browser is not None, "no Chromium on this machine: apt-get install chromium (.ci/run installs it)"
    profile = report.parent / ".chromium-profile"
    result = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert result.stdout.count("<img") == expected_images
    assert "Sizes, parameters, training and generation" in result.stdout
    shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_compare_runs_and_reports_on_every_family(family, write_experiment, family_model, tiny_clip_dir):
    path = write_experiment(max_train_steps=2, model=family_model(family))
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {
        "prompts": ["a red circle"], "seeds_per_prompt": 1, "num_inference_steps": 2, "guidance_scale": 3.0,
        "clip_model": str(tiny_clip_dir), "metrics": ["clip_score"],
    }
    path.write_text(yaml.safe_dump(raw))
    report = compare(load_experiment(path), progress=False)
    root = report.parent
    for name in ("full", "lora"):
        record = json.loads((root / "records" / f"train-{name}-seed0.json").read_text())
        assert record["status"] == "finished" and record["model"]["family"] == family
        evaluation = json.loads((root / "records" / f"eval-{name}-seed0.json").read_text())
        assert evaluation["metrics"]["clip_score"]["skipped"] is None
    markdown = (root / "report.md").read_text()
    assert "| Denoiser | VAE | Text encoders |" in markdown.replace("Model | Kind | Status | ", "")
    assert "| full | full | finished |" in markdown and "| lora | lora | finished |" in markdown


@pytest.mark.slow
def test_plan_commands_then_evaluate_only(compare_experiment, tmp_path):
    """--plan: one independent command per technique × seed (what a SLURM array runs); then
    --evaluate-only evaluates what finished and marks what did not as missing."""
    import os
    import sys

    from sdtune.comparison import compare_plan as plan

    experiment = compare_experiment(metrics=["clip_score"])
    entries = plan(experiment, seeds=[0, 1])
    assert [(e["technique"], e["seed"]) for e in entries] == [("full", 0), ("lora", 0), ("full", 1), ("lora", 1)]
    for entry in entries[1:2] + entries[3:]:  # the scheduler ran only the LoRA jobs
        command = [sys.executable, "-m", "sdtune", *entry["command"][1:], "--no-progress"]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
    seeded = json.loads((tmp_path / "runs" / "seed-1" / "lora" / "record.json").read_text())
    assert seeded["seeds"]["train"] == 1 and seeded["config"]["train"]["seed"] == 1  # the config it really used
    report = compare(experiment, seeds=[0, 1], progress=False, evaluate_only=True)
    markdown = (report.parent / "report.md").read_text()
    assert "| full | full | missing |" in markdown and "| lora | lora | finished |" in markdown
    assert (report.parent / "records" / "eval-lora-seed1.json").exists()
    assert not (report.parent / "seed-0" / "full").exists()  # nothing was trained
