"""The report's "What each technique changed" (unit tier): built from records alone, its paragraph's
numbers are the records', a failed check is marked, and the scatter takes trials' records too."""

from __future__ import annotations

from dataclasses import asdict

import torch

from sdtune import records
from sdtune.anatomy.compute import layer_anatomy, summarise
from sdtune.anatomy.layers import WeightPair
from sdtune.models.sd1 import StableDiffusion1
from sdtune.report import render_report
from sdtune.report.change_plots import change_scatter
from sdtune.report.changes import change_points

ATTENTION = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "up_blocks.1.resnets.0.conv1"


def _anatomy(changes: dict[str, torch.Tensor]) -> dict:
    """The anatomy of ΔW matrices added to fixed random base weights (one per layer path)."""
    layers, sizes = [], []
    for index, (path, delta) in enumerate(changes.items()):
        before = torch.randn(delta.shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        pair = WeightPair("unet", path, "Linear", before, before + delta.double(), adapted=False)
        layers.append(layer_anatomy(pair, StableDiffusion1))
        sizes.append(("unet", path, float(before.square().sum())))
    return asdict(summarise(layers, sizes, StableDiffusion1, "test weights", 0.5, "cpu"))


def _check(failures: list[dict] | None = None) -> dict:
    return {"trained": asdict(records.TrainedCheck(
        passed=not failures, failures=failures or [], checked={"trained_tensors": 2}, unreachable=[],
        gradient_watch_steps=2, digests="whole tensors", time_s=0.01,
    ))}


def _train(name: str, kind: str, anatomy: dict, check: dict, learning_rate: float = 1e-4) -> records.TrainRecord:
    return records.TrainRecord(
        status="finished", technique={"name": name, "kind": kind, "options": {}}, seeds={"train": 0},
        config={"name": "t", "techniques": {"full": {}, "lora": {}, "broken": {}}}, steps={"done": 10, "max": 10},
        train={"learning_rate": learning_rate}, checks=check, anatomy=anatomy,
        timing={"train_time_s": 1.0, "s_per_step": 0.1, "images_per_s": 1.0}, memory={"peak": {"bytes": 1, "kind": "cpu_peak_rss"}},
        outputs={}, parameters={"trainable": 1, "components": {}},
    )


def _eval(label: str, full_style: float) -> records.EvalRecord:
    metrics = {"judge_full_style": {"value": full_style, "direction": "none"},
               "judge_style_split": {"value": {"base": 0.1, "partial": 0.9 - full_style, "full": full_style}}}
    return records.EvalRecord(label=label, metrics=metrics, images=[], config={}, train_seed=0 if label != "base" else None)


def _write(root, train, evals):
    for i, record in enumerate([*train, *evals]):
        records.write_record(root / "records" / f"r{i}.json", record)


def test_the_section_reads_its_numbers_from_the_records(tmp_path):
    generator = torch.Generator().manual_seed(0)
    full = _anatomy({CONV: 1e-3 * torch.randn(64, 96, generator=generator), ATTENTION: 1e-3 * torch.randn(64, 64, generator=generator)})
    direction = torch.randn(64, 1, generator=generator)
    lora = _anatomy({ATTENTION: 5.0 * direction @ torch.randn(1, 64, generator=generator)})  # rank 1, a new direction
    broken = _anatomy({ATTENTION: torch.zeros(64, 64)})
    failure = {"item": "gradient", "where": "unet.x.lora_A.default.weight", "detail": "never got a non-zero gradient"}
    train = [_train("full", "full", full, _check()), _train("lora", "lora", lora, _check()),
             _train("broken", "lora", broken, _check([failure]))]
    _write(tmp_path, train, [_eval("base", 0.0), _eval("full", 0.45), _eval("lora", 0.10), _eval("broken", 0.0)])
    render_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    section = text[text.index("## What each technique changed"):text.index("## Everything this comparison")]
    assert "| broken | FAILED (gradient) |" in section and "unet.x.lora_A.default.weight" in section
    assert "finished · check FAILED" in text  # the study table's status
    paragraph = next(line for line in section.splitlines() if line.startswith("Compared here"))
    assert paragraph.startswith("Compared here: full fine-tuning and LoRA (the study's pair).")
    assert f"Full fine-tuning changed {full['total']['changed_layers']} weight matrices" in paragraph
    assert f"is {full['total']['effective_rank_median']:.1f} for full fine-tuning" in paragraph
    assert f"and {lora['total']['effective_rank_median']:.1f} for LoRA (numerical rank up to 1)" in paragraph
    assert lora["total"]["intruders"] > full["total"]["intruders"]
    assert "LoRA introduces more new directions" in paragraph
    assert "full fine-tuning 45 %, LoRA 10 %" in paragraph  # judge_full_style, from the eval records
    assert "Drift was not measured" in paragraph
    for figure in ("change_heatmap.png", "change_ranks.png", "change_scatter.png"):
        assert (tmp_path / "report_files" / figure).stat().st_size > 0
    assert "What each technique changed" in (tmp_path / "report.html").read_text()


def test_the_scatter_takes_a_techniques_trials_across_learning_rates(tmp_path):
    generator = torch.Generator().manual_seed(1)
    trials = [
        _train("lora", "lora", _anatomy({ATTENTION: scale * torch.randn(16, 16, generator=generator)}), _check(), rate)
        for scale, rate in ((1e-3, 1e-4), (1e-2, 3e-4), (1e-1, 1e-3))
    ]
    for trial, rate in zip(trials, ("1e-4", "3e-4", "1e-3")):
        trial.technique = {**trial.technique, "name": f"lora-lr{rate}"}
    evals = [_eval(f"lora-lr{rate}", share) for rate, share in (("1e-4", 0.1), ("3e-4", 0.2), ("1e-3", 0.4))]
    points = change_points(trials, evals)
    assert [p.learning_rate for p in points] == [1e-4, 3e-4, 1e-3] and all("judge_full_style" in p.metrics for p in points)
    drawn = change_scatter(points, tmp_path / "scatter.png")
    assert drawn is not None and drawn[0].exists() and "judge_full_style" in drawn[1]


def test_the_checks_and_anatomy_entries_are_typed(tmp_path):
    import json

    import pytest

    anatomy = _anatomy({ATTENTION: torch.ones(8, 8)})
    record = _train("lora", "lora", anatomy, _check())
    path = tmp_path / "train.json"
    records.write_record(path, record)
    assert records.read_record_file(path) == record and records.trained_check(record).passed
    data = json.loads(path.read_text())
    for entry, change, message in [
        ("checks", {"trained": {**data["checks"]["trained"], "verdict": "ok"}}, "checks.trained: unknown key 'verdict'"),
        ("anatomy", {k: v for k, v in data["anatomy"].items() if k != "layers"}, "anatomy: missing key 'layers'"),
    ]:
        path.write_text(json.dumps({**data, entry: change}))
        with pytest.raises(records.RecordError, match=message):
            records.read_record_file(path)
