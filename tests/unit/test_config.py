"""The experiment file: shipped configs load, every bad value fails at load with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sdtune.config import ConfigError, read_experiment_file
from sdtune.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "src" / "sdtune" / "configs"  # package data: every install has them
SHIPPED = sorted(FOLDER.rglob("*.yaml"))


def test_every_shipped_config_loads():
    assert len(SHIPPED) == 11, [p.name for p in SHIPPED]  # update when adding a config
    for path in SHIPPED:
        experiment = load_experiment(path)
        for name in experiment.techniques:
            experiment.train_config_for(name)


def test_no_shipped_config_points_at_a_gated_dataset():
    """lambdalabs/pokemon-blip-captions has been gated since 2024: a user running a shipped config
    gets its drop-in mirror, never a download that fails."""
    gated = {"lambdalabs/pokemon-blip-captions"}
    sources = {path.name: yaml.safe_load(path.read_text()).get("data", {}).get("source") for path in SHIPPED}
    assert not {name: source for name, source in sources.items() if source in gated}


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from sdtune.config.shipped import shipped_configs

    assert shipped_configs() == SHIPPED
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    for given in ("pokemon-paper", "pokemon-paper.yaml", "configs/pokemon-paper.yaml"):
        experiment = load_experiment(given)
        assert experiment.name == "pokemon-paper" and experiment.config.source_path == str(FOLDER / "pokemon-paper.yaml")
    for given in ("configs/cards/sdxl-lora-12gb.yaml", "cards/sdxl-lora-12gb", "sdxl-lora-12gb"):
        assert read_experiment_file(given).source_path == str(FOLDER / "cards" / "sdxl-lora-12gb.yaml")
    with pytest.raises(ConfigError, match="does not exist .*pokemon-paper"):
        load_experiment("no-such-experiment.yaml")


def test_pokemon_paper_has_the_study_parameters():
    experiment = load_experiment(FOLDER / "pokemon-paper.yaml")
    data, train = experiment.data, experiment.train
    assert (data.resolution, data.center_crop, data.random_flip) == (512, True, True)
    assert train.batch_size * train.gradient_accumulation_steps == 16
    assert (train.max_train_steps, train.learning_rate, train.mixed_precision) == (100, 1e-5, "no")
    full, lora = experiment.train_config_for("full"), experiment.train_config_for("lora")
    assert (full.lr_scheduler, full.use_ema) == ("constant", True)
    assert (lora.lr_scheduler, lora.use_ema) == ("cosine", False)
    assert experiment.techniques["lora"].options.peft["r"] == 4


def _write(tmp_path, raw) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["train"].update(max_train_steps=-5), "train.max_train_steps: -5 is not allowed"),
        (lambda r: r["train"].update(bacth_size=2), "did you mean 'batch_size'"),
        (lambda r: r["train"].update(batch_size="four"), "train.batch_size: 'four' is not allowed; expected a whole number"),
        (lambda r: r["data"].update(resolution=500), "data.resolution: 500 is not allowed; expected a positive multiple of 8"),
        (lambda r: r.update(model="./no/such/model"), "does not exist"),
        (lambda r: r["data"].update(source="/no/such/folder"), "data.source: '/no/such/folder' does not exist"),
        (lambda r: r["techniques"].update(x={"kind": "qlora"}), "'qlora' is not a technique; choose one of: boft, dora, full, loha, lokr, lora, oft, partial, textual-inversion"),
        (lambda r: r["techniques"]["lora"].update(rnak=4), "techniques.lora.rnak: not an option of technique kind 'lora'"),
        (lambda r: r["train"].update(mixed_precision="fp8"), "expected one of 'no', 'fp16', 'bf16'"),
        (lambda r: r["train"].update(max_train_steps=None), "give max_train_steps or num_epochs"),
        (lambda r: r.update(trian={}), "trian: unknown key (did you mean 'train'?)"),
        (lambda r: r["techniques"]["full"].update(lr_scheduler="cosine_warm"), "lr_scheduler: 'cosine_warm' is not allowed"),
        (lambda r: r["data"].update(cache="disk", center_crop=False), "data.cache: 'disk' needs data.center_crop: true"),
        (lambda r: r["techniques"].update(p={"kind": "partial", "preset": "middle"}), "'middle' is not a preset"),
        (lambda r: r["techniques"]["lora"].update(layers_pattern="x"), "peft rejected the lora options"),
        (lambda r: r["techniques"].update(lora="lora"), "techniques.lora: 'lora' is not allowed; expected a mapping"),
        (lambda r: r["train"].update(num_epochs=2), "give max_train_steps or num_epochs, not both"),
        (lambda r: r["train"].update(lr_warmup_steps=10), "use lr_scheduler: constant_with_warmup"),
        (lambda r: r.update(evaluation={"scheduler": "FastScheduler"}), "evaluation.scheduler: 'FastScheduler'"),
        (lambda r: r.update(evaluation={"metrics": ["clip"]}), "evaluation.metrics: 'clip' is not a metric"),
        (lambda r: r.update(model={"path": r["model"], "family": "flux"}), "model.family: 'flux' is not allowed"),
        (lambda r: r["techniques"]["lora"].update(use_dora=True), "techniques.lora.use_dora: not an option"),
        (lambda r: r.update(evaluation={"seeds_per_prompt": 2, "seeds_per_prompt_during_training": 3}),
         "evaluation.seeds_per_prompt_during_training: 3 is not allowed; expected at most evaluation.seeds_per_prompt (2)"),
    ],
)
def test_bad_values_fail_at_load_with_one_line(tmp_path, tiny_model, tiny_data, change, message):
    from sdtune.testing import experiment_dict

    raw = experiment_dict(tiny_model, tiny_data)
    change(raw)
    with pytest.raises(ConfigError) as error:
        load_experiment(_write(tmp_path, raw))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_overrides_and_number_strings(tmp_path, tiny_model, tiny_data):
    from sdtune.testing import experiment_dict

    raw = experiment_dict(tiny_model, tiny_data)
    raw["train"]["learning_rate"] = "1e-5"  # YAML 1.1 reads this as a string
    experiment = load_experiment(
        _write(tmp_path, raw), ["train.max_train_steps=10", "techniques.lora.rank=8", "data.random_flip=false"]
    )
    assert experiment.train.learning_rate == 1e-5
    assert experiment.train.max_train_steps == 10
    assert experiment.techniques["lora"].options.peft["r"] == 8
    assert experiment.data.random_flip is False
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_experiment(_write(tmp_path, raw), ["train.max_train_steps"])


def test_relative_paths_resolve_against_the_file(tmp_path, tiny_model, tiny_data):
    import shutil

    from sdtune.testing import experiment_dict

    shutil.copytree(tiny_data, tmp_path / "images")
    raw = experiment_dict(tiny_model, "images")
    experiment = load_experiment(_write(tmp_path, raw))
    assert Path(experiment.data.source) == (tmp_path / "images").resolve()
