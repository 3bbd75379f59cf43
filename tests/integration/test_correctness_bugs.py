"""Correctness bugs of issue #20 §7, each pinned by a test that fails on the old behaviour.

Unit tier except the textual-inversion run and the cache key (integration: a tiny run, a tiny data
folder) and the sharded launch (slow: torchrun).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from sdtune.config import ConfigError
from sdtune.experiment import experiment_from_dict, load_experiment
from sdtune.training import train_technique


def _raw(tiny_model, tiny_data, **extra):
    from conftest import experiment_dict

    return {**experiment_dict(tiny_model, tiny_data), **extra}


# -- textual inversion: every vector trains with shuffled captions --------------------------------------
SHUFFLED_TI = {
    "ti": {"kind": "textual-inversion", "placeholder_token": "<sks>", "initializer_token": "circle", "num_vectors": 3,
           "learning_rate": 5e-2, "adam_weight_decay": 0.0},  # (decay alone would move a row with no gradient)
}


def test_textual_inversion_with_shuffled_captions_trains_every_vector(write_experiment, tiny_model):
    """The shuffled caption is built from the raw caption; the technique's transform (the placeholder
    spelled as all its vectors) is applied after shuffling, so vectors 2..n are in the prompt too."""
    from sdtune.data.dataset import prepare_training_set

    path = write_experiment(
        techniques=SHUFFLED_TI, max_train_steps=2,
        data={"instance_prompt": "<sks>, a red toy, on a table", "shuffle_captions": True},
    )
    experiment = load_experiment(path)
    training_set = prepare_training_set(experiment.data, progress=False)
    training_set.transform_captions(experiment.techniques["ti"].build().transform_caption)
    shuffled = {training_set.caption(0, seed=0, epoch=epoch, slot=0) for epoch in range(6)}
    assert len(shuffled) > 1 and all("<sks> <sks>_1 <sks>_2" in caption for caption in shuffled)
    result = train_technique(experiment, "ti", progress=False)
    from sdtune.techniques.textual_inversion import single_token_id

    embeddings = result.model.components["text_encoder"].get_input_embeddings()
    start = embeddings.original.weight[single_token_id(result.model.tokenizers["tokenizer"], "circle", "text_encoder")]
    vectors = embeddings.vectors.detach()
    assert vectors.shape[0] == 3 and all(not torch.equal(row, start.float()) for row in vectors), "a vector never moved"


# -- a per-technique seed would override `compare --seeds` ----------------------------------------------
def test_a_per_technique_seed_is_refused_and_a_sweep_seed_reaches_every_technique(tiny_model, tiny_data):
    raw = _raw(tiny_model, tiny_data)
    raw["techniques"]["lora"]["seed"] = 3
    with pytest.raises(ConfigError, match=r"^techniques\.lora\.seed: every technique of an experiment shares train\.seed"):
        experiment_from_dict(raw)
    experiment = experiment_from_dict(_raw(tiny_model, tiny_data)).with_seed(7)
    assert {name: item.train.seed for name, item in experiment.techniques.items()} == {"full": 7, "lora": 7}
    assert experiment.train.seed == 7


# -- a prompt listed both in and out of domain keeps each flag -------------------------------------------
def test_a_prompt_listed_in_and_out_of_domain_keeps_each_flag(tiny_model, tiny_data):
    evaluation = {"prompts": ["yoda", "a red circle"], "out_of_domain_prompts": ["yoda"], "seeds_per_prompt": 2}
    plan = experiment_from_dict(_raw(tiny_model, tiny_data, evaluation=evaluation)).plan
    assert plan.pairs() == [("yoda", 0), ("yoda", 1), ("a red circle", 0), ("a red circle", 1), ("yoda", 0), ("yoda", 1)]
    assert plan.pair_in_domain() == [True, True, True, True, False, False]  # (prompts.index gave the last two True)


# -- `sdtune generate` never takes an SD2 pipeline for SD1 -------------------------------------------------
def test_an_sd2_pipeline_is_never_taken_for_sd1():
    """SD1 and SD2 share StableDiffusionPipeline: a fact they share is read; one they do not share is
    refused instead of being SD1's (the registry's first family of that class)."""
    from sdtune.models import FAMILIES
    from sdtune.models.sampling import pipeline_fact

    pipe = type("StableDiffusionPipeline", (), {})()
    assert pipeline_fact(pipe, "denoiser_name") == "unet"
    assert FAMILIES.get("sd1").default_resolution != FAMILIES.get("sd2").default_resolution
    with pytest.raises(ValueError, match="families that disagree on default_resolution"):
        pipeline_fact(pipe, "default_resolution")


# -- the prior loss weight has one source: the run's train settings ---------------------------------------
def test_prior_samples_carry_no_loss_weight_of_their_own():
    from sdtune.training.prior import PriorSamples

    assert "prior_loss_weight" not in {f.name for f in dataclasses.fields(PriorSamples)}


# -- the latent cache key holds the captions as the text encoders see them --------------------------------
def test_techniques_with_different_caption_transforms_never_share_cached_text(write_experiment, tmp_path):
    from sdtune.data.dataset import prepare_training_set
    from sdtune.training.inputs import open_latent_cache

    techniques = {"plain": {"kind": "lora"}, **SHUFFLED_TI}
    experiment = load_experiment(write_experiment(techniques=techniques, data={"instance_prompt": "a <sks> toy", "cache": "disk"}))
    keys = {}
    for name in ("plain", "ti", "plain-again"):
        training_set = prepare_training_set(experiment.data, progress=False)
        training_set.transform_captions(experiment.techniques[name.removesuffix("-again")].build().transform_caption)
        cache = open_latent_cache(experiment, None, training_set, torch.float32, False, tmp_path / "runs")
        assert cache.caches_texts and cache.mode == "disk"
        keys[name] = cache.key
    assert keys["plain"] == keys["plain-again"] != keys["ti"]


# -- evaluation during training under sharding ------------------------------------------------------------
def _accelerator(stage):
    from types import SimpleNamespace

    plugin = None if stage is None else SimpleNamespace(zero_stage=stage, deepspeed_config={"zero_optimization": {"stage": stage}})
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


SHARDED_EVALUATION = [  # (sharding, ZeRO stage, use_ema, evaluates) → refused because …
    ("fsdp2", None, False, True, "FSDP2 shards the trained weights"),
    ("deepspeed", 3, False, True, "ZeRO-3 partitions the trained weights"),
    ("deepspeed", 2, True, True, "each process keeps only its fragment of the EMA weights"),
    ("deepspeed", 1, True, True, "each process keeps only its fragment of the EMA weights"),
    ("deepspeed", 2, False, True, None),  # every process holds the whole weights
    ("fsdp2", None, True, False, None),  # nothing evaluated during training
    (None, None, True, True, None),  # one process, or DDP
]


@pytest.mark.parametrize(("sharded", "stage", "use_ema", "evaluates", "refused"), SHARDED_EVALUATION)
def test_evaluation_during_training_is_refused_where_one_process_lacks_the_weights(sharded, stage, use_ema, evaluates, refused):
    from sdtune.training.sharding import ShardingError, check_evaluation_during_training

    if refused is None:
        check_evaluation_during_training(_accelerator(stage), sharded, use_ema, evaluates)
        return
    with pytest.raises(ShardingError, match=refused) as raised:
        check_evaluation_during_training(_accelerator(stage), sharded, use_ema, evaluates)
    assert "evaluation.every_steps, data.validation" in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.slow
def test_a_sharded_launch_with_evaluation_during_training_is_refused_before_the_model_loads(write_experiment, tmp_path):
    from test_distributed import _torchrun
    from test_sharding import FSDP2_ENV

    path = write_experiment(techniques={"lora": {"kind": "lora"}}, max_train_steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {"every_steps": 1, "prompts": ["a red circle"], "seeds_per_prompt": 1, "num_inference_steps": 2}
    path.write_text(yaml.safe_dump(raw))
    launched = _torchrun("train", str(path), "--output", str(tmp_path / "runs"), "--no-progress", extra_env=FSDP2_ENV)
    assert launched.returncode != 0
    errors = [line for line in launched.stderr.splitlines() if line.startswith("sdtune: error:")]
    assert errors and all("FSDP2 shards the trained weights" in line for line in errors), launched.stderr[-3000:]
    assert "Traceback" not in launched.stderr.split("sdtune: error:")[0]  # (before the launcher's own report)
    assert not (tmp_path / "runs" / "lora" / "logs").exists()  # nothing trained, no log opened
