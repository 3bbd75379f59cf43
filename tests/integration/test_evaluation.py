"""The evaluation layer: held-out split, validation loss, quality over training, typed records,
the benchmark metrics end to end, one-line errors, and the module dependencies (no cycles)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from sdtune.config import ConfigError
from sdtune.config.split import held_out_rows, parse_validation
from sdtune.experiment import experiment_from_dict, load_experiment
from sdtune.records import SCHEMA_VERSION, EvalRecord, RecordError, read_record_file, write_record


def test_held_out_rows_are_fixed_by_their_seed_and_never_all():
    split = parse_validation({"fraction": 0.25, "seed": 3})
    rows = held_out_rows(split, 8)
    assert len(rows) == 2 and rows == held_out_rows(split, 8)
    assert any(held_out_rows(parse_validation({"fraction": 0.25, "seed": s}), 8) != rows for s in range(4, 8))
    assert len(held_out_rows(parse_validation(0.99), 3)) == 2  # at least one row stays for training
    assert held_out_rows(parse_validation("some/other-dataset"), 8) == []  # a separate source
    for bad, message in [(1.5, r"share in \(0, 1\)"), ({"fraction": 0.1, "source": "x"}, "not both"),
                         ({"fractoin": 0.1}, "unknown key"), (True, "expected a fraction")]:
        with pytest.raises(ConfigError, match=message) as caught:
            parse_validation(bad)
        assert "\n" not in str(caught.value)


def test_validation_images_are_never_trained_on(write_experiment):
    from sdtune.data.dataset import prepare_training_set

    experiment = load_experiment(write_experiment(data={"validation": {"fraction": 0.25, "seed": 1}}))
    training_set = prepare_training_set(experiment.data, progress=False, held_out=experiment.validation)
    held_out = held_out_rows(parse_validation(experiment.data.validation), 8)
    assert len(training_set) == 6 and not set(training_set.indices) & set(held_out)


@pytest.mark.parametrize("family_name", ["sd1", "sdxl", "sd3"])
def test_validation_loss_is_deterministic_and_follows_the_weights(family_name, write_experiment, family_model):
    from sdtune import diffusion
    from sdtune.data.heldout import validation_images
    from sdtune.training.evaluator import ValidationBatch, fixed_timesteps, validation_loss

    experiment = load_experiment(write_experiment(data={"validation": 0.5}, model=family_model(family_name)))
    model = experiment.family.load(experiment.model)
    objective = diffusion.build_objective(model.objective, model.noise_schedule(), experiment.techniques["full"].objective)
    timesteps = fixed_timesteps(objective, 3)
    if objective.name == "ddpm":
        assert timesteps.tolist() == [166, 500, 833]  # the middle of each third of DDPM's 1000 steps
    else:  # rectified flow: σ at the same quantiles, shifted as the model's scheduler shifts them
        sigmas = (timesteps / objective.num_train_timesteps).tolist()
        assert sigmas == sorted(sigmas) and 0 < sigmas[0] and sigmas[-1] < 1
    batch = ValidationBatch.from_images(validation_images(experiment.data, experiment.validation, 10), experiment.data.resolution)
    assert len(batch.captions) == 4

    def loss() -> list[float]:
        return validation_loss(model, objective, batch, timesteps, 3)

    first = loss()
    assert len(first) == 3 and all(math.isfinite(v) for v in first)
    assert loss() == first  # fixed noise, fixed timesteps: the same number every time
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.denoiser.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    assert loss() != first


def test_drift_and_the_pickscore_plugin(tiny_clip_dir, tmp_path):
    from PIL import Image

    from sdtune.metrics import ClipScorer, MetricContext, compute_all, drift

    assert drift([1.0, -1.0, 0.0]).tolist() == [0.0, 1.0, 0.5]  # peft: (1 − cos) / 2
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    scorer = ClipScorer.load(str(tiny_clip_dir))

    def context(**extra) -> MetricContext:
        return MetricContext(images=images, prompts=["a red square", "yoda"], seeds=[0, 0], training_images=[], **extra)

    scored = compute_all(context(loaders={"pickscore": lambda: scorer}), ["pickscore"])["pickscore"]
    expected = scorer.logit_scale * (scorer.image_embeddings(images) * scorer.text_embeddings(["a red square", "yoda"])).sum(1)
    assert scored["value"] == pytest.approx(float(expected.mean()))
    missing = compute_all(context(pickscore_model=str(tmp_path / "no-pickscore"), device="cpu"), ["pickscore"])
    assert missing["pickscore"]["value"] is None and "could not be loaded" in missing["pickscore"]["skipped"]
    assert "evaluation.pickscore_model" in missing["pickscore"]["skipped"] and "\n" not in missing["pickscore"]["skipped"]


def test_evaluation_during_training_changes_nothing_and_survives_a_resume(write_experiment, tmp_path):
    """full + EMA (the evaluation swaps the EMA weights in and out): with a separate validation set
    and every_steps, the weights and losses equal a run without evaluation; interrupted and resumed,
    the evaluations (validation losses, images at step 2) equal the uninterrupted run's."""
    import os
    import signal

    from safetensors.torch import load_file

    from sdtune.testing import make_imagefolder
    from sdtune.training import train_technique

    validation = make_imagefolder(tmp_path / "validation", count=3, seed=5)
    path = write_experiment(max_train_steps=4, gradient_accumulation_steps=1, data={"center_crop": True})
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {"prompts": ["a red circle"], "seeds_per_prompt": 1, "num_inference_steps": 2}
    path.write_text(yaml.safe_dump(raw))
    evaluated = ["data.validation=" + str(validation), "evaluation.every_steps=2"]

    def run(name: str, extra: list[str], **options):
        return train_technique(load_experiment(path, [f"output_dir={tmp_path / name}", *extra]), "full", progress=False, **options)

    def interrupt_at_3(done: int) -> None:
        if done == 3:
            os.kill(os.getpid(), signal.SIGINT)

    plain, straight = run("plain", []), run("straight", evaluated)
    assert run("stopped", evaluated, after_step=interrupt_at_3).status == "interrupted"
    resumed = run("stopped", evaluated, resume=True)
    weights = "unet/diffusion_pytorch_model.safetensors"
    tensors = [load_file(result.run_dir / weights) for result in (plain, straight, resumed)]
    assert all(torch.equal(tensors[0][k], other[k]) for other in tensors[1:] for k in tensors[0])
    losses = [[h["loss"] for h in r.record["loss_history"]] for r in (plain, straight, resumed)]
    assert losses[0] == losses[1] == losses[2]
    assert plain.record["evaluation"] == [] and [e["step"] for e in straight.record["evaluation"]] == [0, 2, 4]
    # the evaluations' time is their own, in neither the loop's nor the checkpoints'
    assert plain.record["timing"]["evaluation_time_s"] == 0 < straight.record["timing"]["evaluation_time_s"]
    generated = straight.record["evaluation"][1]["generation"]["time_s"]
    assert straight.record["timing"]["evaluation_time_s"] > generated > 0  # (and the validation losses)
    def measured(result) -> list[dict]:  # (the generation timings differ from run to run)
        return [{k: v for k, v in e.items() if k != "generation"} for e in result.record["evaluation"]]

    assert measured(resumed) == measured(straight)
    images = [sorted((r.run_dir / "evaluation" / "step-000002").iterdir()) for r in (straight, resumed)]
    assert [p.read_bytes() for p in images[0]] == [p.read_bytes() for p in images[1]] and images[0]


def test_records_are_typed_versioned_and_checked(tmp_path):
    record = EvalRecord(label="base", metrics={}, images=[], config={"name": "x"})
    path = tmp_path / "eval-base.json"
    write_record(path, record)
    assert read_record_file(path) == record and json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    data = json.loads(path.read_text())
    old = {k: v for k, v in data.items() if k not in ("schema_version", "step", "references")}
    path.write_text(json.dumps(old))
    assert read_record_file(path).label == "base"  # a version-1 record (before the typed classes)
    for change, message in [({"colour": 1}, "unknown eval record key 'colour'"),
                            ({"schema_version": SCHEMA_VERSION + 1}, "newer than this sdtune"),
                            ({"kind": "other"}, "not a record kind")]:
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(RecordError, match=message):
            read_record_file(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from sdtune.cli import main
    from sdtune.errors import UserError
    from sdtune.training import check_finite_loss

    assert main(["report", str(tmp_path / "no-comparison-here")]) == 2
    assert main(["generate", str(tmp_path), "--prompt", "a red circle", "--num-images", "0"]) == 2
    assert main(["generate", str(tmp_path), "--prompt", "a red circle", "--scheduler", "NoSuchScheduler"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("sdtune: error: ") for line in lines)
    assert "no records/ folder" in lines[0] and "--num-images 0" in lines[1] and "DDIMScheduler" in lines[2]
    with pytest.raises(UserError, match="loss became nan at step 3; lower train.learning_rate"):
        check_finite_loss(float("nan"), 3)


@pytest.mark.slow  # (default tier under 6 min: over 10 s on 2 cores)
def test_compare_measures_quality_and_validation_loss_over_training(
    write_experiment, tiny_clip_dir, tiny_dino_dir
):
    """`sdtune compare` with data.validation and evaluation.every_steps: benchmark metrics and the
    validation loss per technique, training seed and evaluated step (its images: the first seed of
    each prompt, seeds_per_prompt_during_training); the report's curves; the report re-rendered
    from the records alone is identical."""
    from sdtune.comparison import compare
    from sdtune.report.render import render_report

    path = write_experiment(max_train_steps=2, gradient_accumulation_steps=1, data={"validation": 0.25})
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {
        "prompts": ["a red circle"], "out_of_domain_prompts": ["yoda"], "seeds_per_prompt": 2,
        "seeds_per_prompt_during_training": 1, "num_inference_steps": 2, "guidance_scale": 3.0,
        "clip_model": str(tiny_clip_dir), "dino_model": str(tiny_dino_dir), "every_steps": 1,
        "metrics": ["dino", "clip_i", "clip_t", "drift"],
    }
    path.write_text(yaml.safe_dump(raw))
    report = compare(load_experiment(path), seeds=[0, 1], only="lora", progress=False)
    root = report.parent
    for seed in (0, 1):
        train = json.loads((root / "records" / f"train-lora-seed{seed}.json").read_text())
        assert train["data"]["num_samples"] == 6  # 2 of the 8 images held out
        assert [e["step"] for e in train["evaluation"]] == [0, 1, 2]
        assert all(math.isfinite(e["validation_loss"]) for e in train["evaluation"])
        assert [bool(e["images"]) for e in train["evaluation"]] == [False, True, False]  # 0, end: compare's
        for name in (f"eval-lora-seed{seed}-step1.json", f"eval-lora-seed{seed}.json"):
            evaluation = json.loads((root / "records" / name).read_text())
            assert evaluation["step"] == (1 if "step1" in name else 2)
            seeds = [0] if "step1" in name else [0, 1]  # (the drift metric: each image vs the base's same pair)
            assert [(i["prompt"], i["seed"]) for i in evaluation["images"]] == [(p, s) for p in ("a red circle", "yoda") for s in seeds]
            assert evaluation["references"] == {"set": "validation", "count": 2}
            for metric, (low, high) in {"dino": (-1, 1), "clip_i": (-1, 1), "clip_t": (-1, 1), "drift": (0, 1)}.items():
                entry = evaluation["metrics"][metric]
                assert entry["skipped"] is None, (name, metric)
                # a cosine (DINO, CLIP-I, CLIP-T) or peft's drift (1 − cos) / 2, with its CI around it
                assert low <= entry["details"]["ci_low"] <= entry["value"] <= entry["details"]["ci_high"] <= high
            # CLIP-T over every image; DINO and CLIP-I over the in-domain ones; drift over the out-of-domain
            assert evaluation["metrics"]["clip_t"]["details"]["n"] == len(evaluation["images"])
            # the config stored is the one the run used: a loadable experiment with its own seed
            assert evaluation["config"]["train"]["seed"] == seed
            assert experiment_from_dict(evaluation["config"]).train.seed == seed
    markdown = (root / "report.md").read_text()
    assert "Quality over training steps" in markdown and "Validation loss over training" in markdown
    assert "validation loss" in markdown.split("## Quality metrics")[1].split("\n")[2]
    html = report.read_text()
    (root / "report.md").unlink()
    render_report(root)
    assert (root / "report.md").read_text() == markdown and report.read_text() == html


def test_training_plan_keeps_every_prompt_with_its_first_seeds():
    from sdtune.experiment import EvaluationPlan

    plan = EvaluationPlan(("a red circle", "yoda"), (True, False), (0, 1, 2))
    first = plan.first_seeds(1)
    assert first.pairs() == [("a red circle", 0), ("yoda", 0)] and first.pair_in_domain() == [True, False]
    assert first.positions_in(plan) == [0, 3]  # where the base model's image of the same pair is
    assert plan.first_seeds(None) == plan and plan.first_seeds(2).positions_in(plan) == [0, 1, 3, 4]
