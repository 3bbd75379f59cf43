"""`sdtune demo --tune --quick`: the tuning demo end to end (grid, final runs, both tables, then asha on Ray)."""

from __future__ import annotations

import json

import pytest

from sdtune.demo.tune import compare_selections, format_comparison, run_demo_tune


@pytest.mark.slow
def test_quick_tuning_demo_end_to_end(tmp_path):
    report = run_demo_tune(tmp_path / "demo-tune", quick=True, progress=False)
    root = report.parent
    selection = json.loads((root / "tuning.json").read_text())
    assert selection["status"] == "finished" and set(selection["techniques"]) == {"full", "lora"}
    page = report.read_text()
    assert "At the shared learning rate" in page and "Ranked by validation_loss" in page
    # asha replayed the grid's trials: it trained nothing, and counted fewer trial-steps
    summary = json.loads((root / "grid-vs-asha.json").read_text())
    assert summary["grid_trial_steps"] == 2 * 3 * 2 and 0 < summary["asha_trial_steps"] <= summary["grid_trial_steps"]
    assert json.loads((root / "asha" / "tuning.json").read_text())["scheduler"] == "asha"


def test_grid_vs_asha_summary():
    grid = {"techniques": {"a": {"chosen_learning_rate": 1e-3, "trial_steps": 36 * 5},
                           "b": {"chosen_learning_rate": 3e-4, "trial_steps": 36 * 5}}}
    asha = {"techniques": {"a": {"chosen_learning_rate": 1e-3, "trial_steps": 36 + 4 * 4},
                           "b": {"chosen_learning_rate": 1e-4, "trial_steps": 2 * 36 + 12 + 2 * 4}}}
    summary = compare_selections(grid, asha)
    assert summary["same_choices"] == 1 and summary["asha_fraction"] == pytest.approx((52 + 92) / 360)
    text = format_comparison(summary)
    assert "a: grid 1e-3, asha 1e-3 (same)" in text and "1 of 2 choices the same, at 40 % of the grid's trial-steps" in text


def test_full_tuning_demo_is_the_plain_demos_techniques_each_with_its_own_range(tmp_path):
    """The full-size experiment (not run here: ~15 CPU-minutes): the plain demo's six techniques (never
    its quantised extras, which need bitsandbytes), five rates each, full fine-tuning's a decade lower."""
    import sdtune
    from sdtune.demo.run import DemoSettings
    from sdtune.demo.tune import SHARED_LEARNING_RATE, TuneSettings, tune_experiment

    experiment = sdtune.load_experiment(tune_experiment(tmp_path, TuneSettings()))
    assert tuple(experiment.techniques) == DemoSettings.techniques
    assert not any(spec.quantize_overrides for spec in experiment.techniques.values())
    grids = experiment.tuning.learning_rates
    assert all(len(rates) == 5 for rates in grids.values()) and SHARED_LEARNING_RATE in grids["full"]
    assert max(grids["full"]) < max(grids["lora"])  # full fine-tuning's range sits lower
