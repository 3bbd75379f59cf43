"""The tuning report from records alone: both tables, the sentence of every ranking change, the budget,
the edge-of-range note, the figures; and the pure pieces of the selection (scores, choice, rungs, front)."""

from __future__ import annotations

import html as html_text
from pathlib import Path

from sdtune import records
from sdtune.report.tuning import render_tuning_report, tuning_summary
from sdtune.report.tuning_plots import pareto_front, point_labels
from sdtune.report.tuning_summary import load_study, ranking_sentences, ranks
from sdtune.tuning.plan import first_change, rate_label
from sdtune.tuning.ray_engine import asha_rungs
from sdtune.tuning.select import choose, technique_summary, trial_entry


def _trial(rate: float, score: float | None, status: str = "finished") -> dict:
    return {"learning_rate": rate, "status": status, "score": score, "steps": 4, "complete": status == "finished",
            "curve": [{"step": 0, "validation_loss": 0.9}, {"step": 4, "validation_loss": score}], "wall_time_s": 2.0}


def _final(root: Path, name: str, seed: int, rate: float, loss: float, dino: float, drift: float) -> None:
    """One final run's train and eval records, as `sdtune compare` writes them."""
    train = {
        "kind": "train", "status": "finished", "technique": {"name": name, "kind": name}, "seeds": {"train": seed},
        "config": {"techniques": {"a": {}, "b": {}}}, "train": {"learning_rate": rate}, "steps": {"done": 4, "max": 4},
        "evaluation": [{"step": 0, "validation_loss": 0.9}, {"step": 4, "validation_loss": loss}],
        "timing": {"train_time_s": 4.0, "s_per_step": 1.0, "images_per_s": 4.0}, "memory": {"peak": {"bytes": 5e8, "kind": "cpu_peak_rss"}},
        "parameters": {"trainable": 1000, "components": {"unet": 5000}}, "outputs": {"adapter": {"bytes": 4000}},
        "anatomy": {"method": {}, "weights": "the saved weights", "blocks": {}, "kinds": {}, "layers": [], "time_s": 0.1,
                    "device": "cpu", "total": {"relative": rate * 10, "intruders": 3.0 if name == "b" else 0.0}},
    }
    records.write_record(root / "records" / f"train-{name}-seed{seed}.json", train)
    metrics = {"dino": {"value": dino, "direction": "higher"}, "drift": {"value": drift, "direction": "lower"}}
    evaluation = {"kind": "eval", "label": name, "metrics": metrics, "images": [], "config": {}, "train_seed": seed, "step": 4}
    records.write_record(root / "records" / f"eval-{name}-seed{seed}.json", evaluation)


def _study(tmp_path: Path) -> Path:
    """At the shared 1e-3, a (loss 0.50) beats b (0.60); at the tuned rates b (3e-3: 0.40) beats a (1e-3: 0.50)."""
    root = tmp_path / "study"
    techniques = {
        "a": technique_summary([_trial(1e-4, 0.7), _trial(1e-3, 0.5), _trial(1e-2, None, "failed")], "lower", 1e-3),
        "b": technique_summary([_trial(3e-4, 0.8), _trial(1e-3, 0.6), _trial(3e-3, 0.4)], "lower", 1e-3),
    }
    tuning = {"select_by": "validation_loss", "direction": "lower", "rank_by": "validation_loss", "rank_direction": "lower",
              "seeds": [0, 1], "scheduler": "grid", "reduction_factor": 3, "shared_learning_rate": 1e-3, "pareto": None}
    budget = {"trials_per_technique": 3, "steps_per_trial": 4, "samples_per_step": 16, "samples_per_trial": 64,
              "selection_split": {"validation_images": 24}, "held_equal": ["optimizer steps per trial", "samples per step"]}
    finals = {arm: {"root": f"finals/{arm}", "learning_rates": {}} for arm in ("shared", "tuned")}
    records.write_record(root / records.TUNING_FILE, records.TuningRecord(
        experiment="two", status="finished", tuning=tuning, budget=budget, techniques=techniques, fingerprint="x",
        config={}, finals=finals))
    for seed in (0, 1):
        jitter = 0.01 * seed
        _final(root / "finals" / "shared", "a", seed, 1e-3, 0.50 + jitter, 0.60, 0.10)
        _final(root / "finals" / "shared", "b", seed, 1e-3, 0.60 + jitter, 0.50, 0.05)
        _final(root / "finals" / "tuned", "a", seed, 1e-3, 0.50 + jitter, 0.60, 0.10)
        _final(root / "finals" / "tuned", "b", seed, 3e-3, 0.40 + jitter, 0.70, 0.20)
    return root


def test_a_ranking_change_between_the_shared_and_the_tuned_rates_is_stated(tmp_path):
    root = _study(tmp_path)
    sentences = ranking_sentences(load_study(root))
    assert sentences == [
        "Ranked by validation_loss (lower is better): at the shared 1e-3, b ranks 2nd of 2; at its tuned 3e-3 it ranks 1st.",
        "Ranked by validation_loss (lower is better): at the shared 1e-3, a ranks 1st of 2; at its tuned 1e-3 it ranks 2nd.",
    ]
    report = render_tuning_report(root)
    html, markdown = report.read_text(), (root / "report.md").read_text()
    for page in (html_text.unescape(html), markdown):
        assert "At the shared learning rate" in page and "At each technique's tuned learning rate" in page
        assert sentences[0] in page and "Budget: 3 trials per technique of 4 steps each (16 samples per step, 64 per trial)" in page
        assert "b: the chosen 3e-3 is the highest rate of its range; the best rate may be higher" in page
    # both tables: each technique's rate, rank and mean [CI] over the two seeds, side by side
    assert "| b | 3e-3 | 1 | 0.7 | 0.2 | 0.405 [0.4, 0.41] |" in markdown
    assert "| b | 1e-3 | 2 | 0.5 | 0.05 | 0.605 [0.6, 0.61] |" in markdown
    # the sensitivity curves, the fidelity-vs-drift plot, and what each technique changed across learning rates
    assert html.count("data:image/png;base64,") == 3 and "What each technique changed, across learning rates" in html
    assert (root / "report_files" / "sensitivity.png").exists() and (root / "report_files" / "pareto.png").exists()
    # re-rendered from the records alone: the same page
    report.unlink()
    assert render_tuning_report(root).read_text() == html
    text = tuning_summary(root)
    assert sentences[1] in text and "At the shared learning rate" in text


def test_the_same_order_is_one_sentence(tmp_path):
    root = _study(tmp_path)
    _final(root / "finals" / "tuned", "b", 0, 3e-3, 0.70, 0.5, 0.1)
    _final(root / "finals" / "tuned", "b", 1, 3e-3, 0.70, 0.5, 0.1)
    assert ranking_sentences(load_study(root)) == [
        "Ranked by validation_loss (lower is better), the order is the same at the shared 1e-3 and at the tuned rates: a, b."
    ]


def test_selection_picks_the_best_finished_trial_and_flags_the_edges():
    assert choose([_trial(1e-4, 0.7), _trial(1e-3, 0.5), _trial(1e-2, 0.6)], "lower") == {
        "chosen_learning_rate": 1e-3, "score": 0.5, "at_edge": None}
    # a diverged top rate is not chosen, and the next one is not at the edge of the range
    assert choose([_trial(1e-4, 0.7), _trial(1e-3, 0.5), _trial(1e-2, None, "failed")], "lower")["at_edge"] is None
    assert choose([_trial(1e-4, 0.7), _trial(1e-3, 0.5)], "higher") == {"chosen_learning_rate": 1e-4, "score": 0.7, "at_edge": "low"}
    assert choose([_trial(1e-4, 0.5), _trial(1e-3, 0.5)], "lower")["chosen_learning_rate"] == 1e-4  # ties: the lower rate
    assert choose([_trial(1e-4, None, "failed")], "lower")["chosen_learning_rate"] is None
    record = {"status": "finished", "steps": {"done": 2}, "evaluation": [
        {"step": 0, "validation_loss": 1.0}, {"step": 1, "validation_loss": 0.9}, {"step": 2, "validation_loss": 0.8, "images": None}]}
    entry = trial_entry(record, 1e-3, "validation_loss", None, Path("/o"), Path("/o/trials/r.json"), 2)
    assert (entry["score"], entry["complete"], entry["record"]) == (0.8, True, "trials/r.json")
    assert trial_entry(record, 1e-3, "validation_loss", None, Path("/o"), Path("/o/r.json"), 4)["complete"] is False


def test_ranks_rungs_labels_front_and_changes():
    assert ranks({"a": 0.5, "b": 0.4, "c": 0.5}, "lower") == {"b": 1, "a": 2, "c": 2}
    assert ranks({"a": 0.5, "b": 0.4}, "higher") == {"a": 1, "b": 2}
    # Ray's ASHAScheduler milestones (grace × η^k) and the last step
    assert asha_rungs(36, 4, 3) == [4, 12, 36] and asha_rungs(40, 4, 3) == [4, 12, 36, 40] and asha_rungs(9, 1, 3) == [1, 3, 9]
    assert [rate_label(r) for r in (1e-4, 5.62e-5, 3e-3)] == ["1e-04", "5.62e-05", "3e-03"]
    points = [("x", 0.1, 0.6), ("y", 0.2, 0.5), ("z", 0.05, 0.7)]  # z: less drift and more fidelity than x and y
    assert pareto_front(points, "lower", "higher") == ["z"]
    assert sorted(pareto_front([("x", 0.1, 0.6), ("y", 0.2, 0.8)], "lower", "higher")) == ["x", "y"]
    assert first_change({"tuning": {"steps": 100, "seeds": [0]}}, {"tuning": {"steps": 50, "seeds": [0]}}) == "tuning.steps: 100 → 50"
    assert first_change({"a": 1}, {"a": 1}) is None


def test_the_change_across_learning_rates_has_each_run_once(tmp_path, monkeypatch):
    """After tune, the anatomy scatter holds every final run at each rate; a run both arms share, once."""
    from sdtune.report import change_plots, tuning_plots

    drawn = []
    real = change_plots.change_scatter
    monkeypatch.setattr(change_plots, "change_scatter", lambda points, path: drawn.append(points) or real(points, path))
    figure = tuning_plots.change_across_rates(load_study(_study(tmp_path)), tmp_path)
    assert figure is not None and figure[0].is_file() and "drift" in figure[1]
    assert sorted((p.label, p.learning_rate, p.metrics["drift"]) for p in drawn[0]) == [
        ("a", 1e-3, 0.10), ("a", 1e-3, 0.10), ("b", 1e-3, 0.05), ("b", 1e-3, 0.05), ("b", 3e-3, 0.20), ("b", 3e-3, 0.20)]


def test_models_on_the_same_point_of_the_pareto_plot_share_one_readable_label():
    points = [("lora @3e-4", 1.0, 0.0), ("loha @3e-4", 1.0, 0.0), ("lora @3e-2", 0.8, 0.65)]
    assert point_labels(points, (1.0, 0.0)) == {(1.0, 0.0): "base\nlora @3e-4\nloha @3e-4", (0.8, 0.65): "lora @3e-2"}
    assert point_labels(points[2:], None) == {(0.8, 0.65): "lora @3e-2"}
