"""The tuning: section (sdtune tune): the grids it resolves to, and every bad value failing at load in one line."""

from __future__ import annotations

import sys

import pytest
import yaml

from sdtune.config import ConfigError, learning_rate_grid
from sdtune.experiment import experiment_from_dict, load_experiment
from sdtune.testing import experiment_dict


def _raw(tiny_model, tiny_data, **tuning):
    raw = experiment_dict(tiny_model, tiny_data)
    raw["data"]["validation"] = 0.25
    raw["tuning"] = {"learning_rate": [1.0e-4, 1.0e-3, 1.0e-2], "steps": 2, **tuning}
    return raw


def _load(tmp_path, raw):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_experiment(path)


def test_log_spaced_grids_are_rounded_to_what_is_trained():
    assert learning_rate_grid({"min": 1e-5, "max": 1e-2, "points": 4}, "x") == (1e-5, 1e-4, 1e-3, 1e-2)
    assert learning_rate_grid({"min": 1e-5, "max": 1e-2, "points": 5}, "x") == (1e-5, 5.62e-5, 3.16e-4, 1.78e-3, 1e-2)
    assert learning_rate_grid(["1e-3", 1e-4], "x") == (1e-4, 1e-3)  # a list, in any order, numbers as strings


def test_the_section_resolves_per_technique_with_an_equal_count(tmp_path, tiny_model, tiny_data):
    raw = _raw(tiny_model, tiny_data, learning_rate={"min": 1e-4, "max": 1e-2, "points": 3}, seeds=[0, 1])
    raw["techniques"]["full"]["tuning"] = {"learning_rate": {"min": 1e-6, "max": 1e-4}}  # points: the shared 3
    experiment = _load(tmp_path, raw)
    tuning = experiment.tuning
    assert tuning.learning_rates == {"full": (1e-6, 1e-5, 1e-4), "lora": (1e-4, 1e-3, 1e-2)}
    assert (tuning.steps, tuning.seeds, tuning.select_by, tuning.direction, tuning.scheduler) == (2, (0, 1), "validation_loss", "lower", "grid")
    assert tuning.grace_steps == 1 and tuning.rank_by == "validation_loss"
    # the technique's own range is not one of its plug-in's options, and the file it writes back loads the same
    assert "tuning" not in experiment.techniques["full"].options_dict()
    again = experiment_from_dict(experiment.to_dict())
    assert again.tuning == tuning


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["tuning"].update(lerning_rate=1), "tuning.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
        (lambda r: r["tuning"].update(learning_rate={"min": 1e-3, "max": 1e-4, "points": 3}), "min 0.001 ≥ max 0.0001; give min < max"),
        (lambda r: r["tuning"].update(learning_rate={"min": 1e-4, "max": 1e-3, "points": 1}), "tuning.learning_rate.points: 1 is not allowed"),
        (lambda r: r["tuning"].update(learning_rate=[1e-4]), "at least 2 learning rates"),
        (lambda r: r["tuning"].update(learning_rate={"min": 1e-4, "max": 1e-3, "step": 2}), "tuning.learning_rate.step: unknown key"),
        (lambda r: r["data"].pop("validation"), "data.validation is not set; add data.validation: 0.1"),
        (lambda r: r["tuning"].update(select_by="sharpness"), "tuning.select_by: 'sharpness' is not a metric"),
        (lambda r: r["tuning"].update(select_by="style_split"), "tuning.select_by: 'style_split' is informational"),
        (lambda r: r.update(evaluation={"metrics": ["clip_score"]}) or r["tuning"].update(rank_by="dino"),
         "tuning.rank_by: 'dino' is not computed by the evaluation; add it to evaluation.metrics"),
        (lambda r: r["tuning"].update(scheduler="asha", select_by="dino"), "tuning.scheduler: asha compares trials at every rung"),
        (lambda r: r["tuning"].update(scheduler="hyperband"), "tuning.scheduler: 'hyperband' is not allowed; expected one of 'grid', 'asha'"),
        (lambda r: r["tuning"].update(seeds=[]), "tuning.seeds: [] is not allowed"),
        (lambda r: r["tuning"].update(grace_steps=5), "tuning.grace_steps: 5 is not allowed; expected at most the steps of a trial (2)"),
        (lambda r: r["tuning"].update(reduction_factor=1), "tuning.reduction_factor: 1 is not allowed"),
        (lambda r: r["tuning"].update(pareto=["dino"]), "tuning.pareto: ['dino'] is not allowed"),
        (lambda r: r["techniques"]["lora"].update(tuning={"steps": 5}), "techniques.lora.tuning.steps: a technique may only move its learning-rate range"),
        (lambda r: r["techniques"]["lora"].update(tuning={"learning_rate": [1e-4, 1e-3]}),
         "techniques.lora.tuning.learning_rate: 2 rates, but tuning.learning_rate has 3; every technique gets the same number of trials"),
        (lambda r: r["techniques"]["lora"].update(batch_size=1), "tuning: the budget must be equal"),
        (lambda r: r.pop("tuning") and r["techniques"]["lora"].update(tuning={"learning_rate": [1e-4, 1e-3]}),
         "techniques.lora.tuning: the experiment has no tuning: section"),
        (lambda r: r["train"].update(max_train_steps=None, num_epochs=1) or r["tuning"].pop("steps"), "tuning.steps: train gives num_epochs"),
        (lambda r: r.update(evaluation={"validation_every_steps": 2}) or r["data"].pop("validation"),
         "evaluation.validation_every_steps: the validation loss needs held-out images"),
    ],
)
def test_bad_tuning_values_fail_at_load_with_one_line(tmp_path, tiny_model, tiny_data, change, message):
    raw = _raw(tiny_model, tiny_data)
    change(raw)
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, raw)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_command_line_choices_fail_in_one_line_before_anything_runs(tmp_path, tiny_model, tiny_data, capsys):
    from sdtune.cli import main

    raw = _raw(tiny_model, tiny_data, scheduler="asha")
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "tuning.scheduler: asha runs on Ray Tune's ASHAScheduler; add --engine ray" in capsys.readouterr().err
    assert main(["tune", str(path), "--only", "dora", "--engine", "ray"]) == 2
    assert "--only 'dora' is not a technique of the experiment" in capsys.readouterr().err
    raw.pop("tuning")
    path.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(path)]) == 2
    assert "the experiment has no tuning: section" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_ray_missing_is_one_line_naming_the_install(monkeypatch):
    from sdtune.tuning.ray_engine import RayMissing, require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(RayMissing, match=r"^--engine ray needs Ray, which is not installed; pip install 'sdtune\[ray\]'$"):
        require_ray()


def test_bad_input_to_tune_is_one_line_and_changes_nothing(tmp_path, tiny_model, tiny_data, capsys):
    """Through the CLI: a bad range, an output that is a file, another command's output, another study."""
    from sdtune.cli import main
    from sdtune.tuning.study import open_selection

    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(_raw(tiny_model, tiny_data, learning_rate={"min": 1e-3, "max": 1e-4, "points": 3})))
    assert main(["tune", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tuning.learning_rate" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    path.write_text(yaml.safe_dump(_raw(tiny_model, tiny_data)))
    (tmp_path / "file").write_text("mine")
    assert main(["tune", str(path), "--output", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"
    compared = tmp_path / "compared"
    (compared / "records").mkdir(parents=True)
    (compared / "report.html").write_text("the comparison's report")
    assert main(["tune", str(path), "--output", str(compared)]) == 2
    err = capsys.readouterr().err
    assert "holds the output of another command (records, report.html), not a tuning study" in err
    assert sorted(p.name for p in compared.iterdir()) == ["records", "report.html"]
    assert (compared / "report.html").read_text() == "the comparison's report"
    study = tmp_path / "study"
    open_selection(load_experiment(path), study, "local")
    before = (study / "tuning.json").read_text()
    assert main(["tune", str(path), "--output", str(study), "--set", "tuning.steps=1", "--plan"]) == 2
    err = capsys.readouterr().err
    assert "holds a tuning study of another experiment (tuning.steps: 2 → 1)" in err and len(err.strip().splitlines()) == 1
    assert (study / "tuning.json").read_text() == before and sorted(p.name for p in study.iterdir()) == ["tuning.json"]


def test_a_trials_learning_rate_is_in_its_run_fingerprint(tmp_path, tiny_model, tiny_data):
    """A trial resumed at another rate is another run: its rate is what the checkpoint's fingerprint compares."""
    from sdtune.training.fingerprint import RunFingerprint, compare
    from sdtune.tuning.plan import trial_experiment, trials

    experiment = _load(tmp_path, _raw(tiny_model, tiny_data))
    low, high = trials(experiment, tmp_path, ["lora"])[:2]
    saved = RunFingerprint.of_config(trial_experiment(experiment, low), "lora").flat()
    resumed = RunFingerprint.of_config(trial_experiment(experiment, high), "lora").flat()
    assert saved["train.learning_rate"] == low.learning_rate != high.learning_rate
    refused, accepted = compare(saved, resumed, steps_done=1)
    assert [change.key for change in refused] == ["train.learning_rate"] and not accepted
