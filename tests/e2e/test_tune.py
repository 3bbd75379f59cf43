"""`sdtune tune` end to end on the tiny model: trials, the selection record, final runs at the tuned and the
shared rate over seeds, the report with both tables; resuming after Ctrl-C; --plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sdtune import records
from sdtune.experiment import load_experiment
from sdtune.report.tuning_summary import load_study, ranking_sentences
from sdtune.tuning import tune, tune_plan

USELESS = 1.0e-9  # far too small to move anything


@pytest.fixture
def tune_experiment(write_experiment, tiny_clip_dir):
    """Two techniques (or the given ones) × three rates (one useless), a validation split, two final seeds."""

    def write(techniques: dict | None = None, **tuning) -> Path:
        path = write_experiment(techniques, data={"validation": 0.25}, max_train_steps=2)
        raw = yaml.safe_load(path.read_text())
        raw["tuning"] = {"learning_rate": [USELESS, 1.0e-3, 1.0e-2], "steps": 2, "seeds": [0, 1], **tuning}
        raw["evaluation"] = {"prompts": ["a red circle"], "seeds_per_prompt": 1, "num_inference_steps": 2,
                             "clip_model": str(tiny_clip_dir), "metrics": ["clip_score"]}
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


def _train_records(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("records/train-*.json"))}


@pytest.mark.slow  # (two trial processes: ~30 s on 2 shared cores)
def test_trials_choose_the_rate_that_moves(tune_experiment):
    """The smallest tune: one technique, two rates, one step each, no final runs."""
    path = tune_experiment({"lora": {"kind": "lora", "rank": 4, "alpha": 8}}, learning_rate=[USELESS, 1.0e-2], steps=1)
    experiment = load_experiment(path)
    root = Path(experiment.output_dir)
    report = tune(experiment, progress=False, finals=False)
    selection = records.load_tuning(root)
    lora = selection.techniques["lora"]
    assert selection.status == "selected" and lora["chosen_learning_rate"] == 1.0e-2
    useless = lora["trials"][0]
    assert useless["learning_rate"] == USELESS and abs(useless["score"] - lora["start_validation_loss"]) < 1e-6
    assert lora["trials"][1]["score"] < useless["score"] and lora["trial_steps"] == 2
    assert (root / "trials" / "lora" / "lr-1e-09" / "lora" / "record.json").exists()
    assert "Selection (validation split only)" in report.read_text()


def test_plan_lists_every_trial_and_final_run(tune_experiment):
    experiment = load_experiment(tune_experiment())
    entries = tune_plan(experiment)
    trials = [e for e in entries if e["phase"] == "trial"]
    finals = [e for e in entries if e["phase"] == "final"]
    assert len(trials) == 6 and len(finals) == 8
    lora = next(e for e in trials if e["technique"] == "lora" and e["learning_rate"] == 1.0e-3)
    assert lora["command"][:2] == ["sdtune", "train"] and lora["run_dir"].endswith("trials/lora/lr-1e-03/lora")
    trial_file = load_experiment(lora["command"][2])  # the trial as it trains: the rate and the steps of the trials
    assert trial_file.train_config_for("lora").learning_rate == 1.0e-3 and trial_file.train_config_for("lora").max_train_steps == 2
    assert list(trial_file.techniques) == ["lora"] and trial_file.evaluation.every_steps is None
    shared = [e for e in finals if e["arm"] == "shared"]
    assert all(e["command"] and e["learning_rate"] == 1.0e-3 for e in shared)
    assert all(e["command"] is None and e["learning_rate"] is None for e in finals if e["arm"] == "tuned")


@pytest.mark.slow
def test_tune_two_techniques_three_rates_two_seeds(tune_experiment):
    experiment = load_experiment(tune_experiment())
    root = Path(experiment.output_dir)
    report = tune(experiment, progress=False)
    trained = _train_records(root)
    assert len(trained) >= 10  # 6 trials + 2 techniques × 2 seeds × 2 arms
    selection = records.load_tuning(root)
    assert selection.status == "finished" and selection.budget["trials_per_technique"] == 3
    for name in ("full", "lora"):
        entry = selection.techniques[name]
        assert entry["chosen_learning_rate"] in (1.0e-3, 1.0e-2), name  # never the rate that moves nothing
        assert [t["learning_rate"] for t in entry["trials"]] == [USELESS, 1.0e-3, 1.0e-2]
        assert all(t["status"] == "finished" and t["steps"] == 2 for t in entry["trials"])
    for arm in ("shared", "tuned"):
        evaluated = sorted(p.name for p in (root / "finals" / arm / "records").glob("eval-*.json"))
        assert evaluated == ["eval-base.json", "eval-full-seed0.json", "eval-full-seed1.json",
                             "eval-lora-seed0.json", "eval-lora-seed1.json"]
    page = report.read_text()
    assert "At the shared learning rate" in page and "tuned learning rate" in page
    sentences = ranking_sentences(load_study(root))
    assert sentences and all(sentence.replace("'", "&#x27;") in page for sentence in sentences)
    # the same command again trains nothing: every record is as it was
    tune(experiment, progress=False)
    assert _train_records(root) == trained


@pytest.mark.slow
def test_an_interrupted_tune_resumes_without_redoing_finished_trials(tune_experiment, tmp_path):
    path = tune_experiment()
    root = tmp_path / "interrupted"
    command = [sys.executable, "-m", "sdtune.cli", "tune", str(path), "--output", str(root), "--no-finals"]
    # its own process group, as a terminal's foreground job: Ctrl-C reaches it and its training processes
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = root / "trials" / "full" / "lr-1e-09" / "records" / "train-full-seed0.json"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    _, error = process.communicate(timeout=300)
    assert process.returncode == 2, error[-2000:]
    assert "run the same `sdtune tune` again to resume" in error.splitlines()[-1]
    finished = {k: v for k, v in _train_records(root).items() if json.loads(v)["status"] == "finished"}
    assert "trials/full/lr-1e-09/records/train-full-seed0.json" in finished and len(finished) < 6
    assert records.load_tuning(root).status == "trials"
    tune(load_experiment(path), output_dir=root, progress=False, finals=False)
    after = _train_records(root)
    assert {k: after[k] for k in finished} == finished  # not trained again
    assert len(after) == 6 and all(json.loads(v)["status"] == "finished" for v in after.values())
    assert records.load_tuning(root).status == "selected"


def test_a_changed_tuning_section_refuses_to_mix(tune_experiment, tmp_path):
    experiment = load_experiment(tune_experiment())
    root = tmp_path / "mixed"
    from sdtune.tuning.study import TuningMismatch, open_selection

    open_selection(experiment, root, "local")
    changed = load_experiment(tune_experiment(steps=1))
    with pytest.raises(TuningMismatch, match=r"holds a tuning study of another experiment \(tuning.steps: 2 → 1\)"):
        tune(changed, output_dir=root, progress=False)
