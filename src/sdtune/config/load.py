"""Reading an experiment file: YAML → ``--set`` overrides → :class:`ExperimentConfig`, every value
checked, relative paths resolved against the file's folder. Nothing here knows the registries
(families, techniques, metrics): :func:`sdtune.experiment.resolve` joins them in."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from sdtune.config.paths import resolve_local
from sdtune.config.schema import ConfigError, build, check_keys, coerce, fail
from sdtune.config.sections import (
    RENAMED_TRAIN_KEYS,
    DataConfig,
    DreamBoothConfig,
    EvaluationConfig,
    ExperimentConfig,
    ModelConfig,
    QuantizeConfig,
    TechniqueEntry,
    TrainConfig,
)
from sdtune.config.shipped import shipped_config, shipped_configs
from sdtune.config.split import resolve_validation_source
from sdtune.config.tuning import TuningConfig, technique_tuning

TOP_KEYS = {"name", "model", "data", "train", "techniques", "evaluation", "dreambooth", "tuning", "output_dir"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SHORTHANDS = {"model": "path", "data": "source"}  # `model: id` means `model: {path: id}`


def read_experiment_file(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``key.path=value`` overrides and check every value. A path
    that does not exist may name a shipped experiment file (:mod:`sdtune.config.shipped`)."""
    path = Path(path)
    if not path.exists():
        path = shipped_config(path) or path
    if not path.exists():
        names = ", ".join(p.stem for p in shipped_configs())
        raise ConfigError(f"experiment file {str(path)!r} does not exist (nor is it a shipped one: {names})")
    if path.is_dir():
        raise ConfigError(f"experiment file {str(path)!r} is a folder; give the experiment's YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; give the experiment's YAML file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the experiment file must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides or []:
        apply_override(raw, override)
    return config_from_dict(raw, source_path=str(path), base_dir=path.parent)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` (value parsed as YAML) in a nested mapping, in place."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. train.max_train_steps=10")
    key, value_text = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if depth == 0 and part in SHORTHANDS and isinstance(node.get(part), str):
            node[part] = _expand(node[part], SHORTHANDS[part])  # `--set model.family=sdxl` on `model: PATH`
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value_text) if value_text.strip() else None


def config_from_dict(
    raw: dict[str, Any], source_path: str | None = None, base_dir: Path | None = None
) -> ExperimentConfig:
    """Check a mapping shaped like an experiment file (relative paths resolve against base_dir)."""
    raw = copy.deepcopy(raw)
    check_keys("", raw, TOP_KEYS)
    for required in ("model", "data", "techniques"):
        if required not in raw:
            raise ConfigError(f"missing section {required!r}; see the shipped configs/pokemon-paper.yaml for an example")
    base_dir = Path(base_dir).resolve() if base_dir else Path.cwd()  # (absolute: "./x" stays a path)
    local = lambda text: resolve_local(text, base_dir)  # noqa: E731

    # `model: id` and `data: source` are shorthands for their one required key
    model = build(ModelConfig, _expand(raw["model"], SHORTHANDS["model"]), "model")
    model = dataclasses.replace(
        model, path=local(model.path), vae=model.vae and local(model.vae),
        single_file_config=model.single_file_config and local(model.single_file_config),
    )
    model.validate()
    data = build(DataConfig, _expand(raw["data"], SHORTHANDS["data"]), "data")
    data = dataclasses.replace(data, source=local(data.source), validation=resolve_validation_source(data.validation, local))
    data.validate()
    _refuse_renamed("train", raw.get("train") or {})
    train = build(TrainConfig, raw.get("train") or {}, "train")
    train.validate()
    evaluation = build(EvaluationConfig, raw.get("evaluation") or {}, "evaluation")
    if evaluation.prompts_file:
        evaluation = dataclasses.replace(evaluation, prompts_file=local(evaluation.prompts_file))
    evaluation.validate()
    if evaluation.validation_every_steps is not None and data.validation is None:
        raise ConfigError(
            "evaluation.validation_every_steps: the validation loss needs held-out images; set data.validation "
            "(e.g. 0.1), or remove this key"
        )
    tuning = None
    if raw.get("tuning") is not None:
        tuning = build(TuningConfig, raw["tuning"], "tuning")
        tuning.validate(train.max_train_steps, data.validation is not None)
    techniques = _techniques(raw["techniques"], train, tuning)
    dreambooth = None
    if raw.get("dreambooth") is not None:
        dreambooth = build(DreamBoothConfig, raw["dreambooth"], "dreambooth")
        dreambooth.validate()
    name = str(raw.get("name") or (Path(source_path).stem if source_path else "experiment"))
    output_dir = raw.get("output_dir")
    return ExperimentConfig(
        model=model, data=data, train=train, techniques=techniques, evaluation=evaluation, dreambooth=dreambooth,
        tuning=tuning, name=name,
        output_dir=None if output_dir is None else str((base_dir / Path(str(output_dir)).expanduser()).resolve()),
        source_path=source_path,
        base_dir=str(base_dir),
    )


def _refuse_renamed(where: str, section: Any) -> None:
    """A train key of an older sdtune fails with its new spelling (one key per setting, no aliases)."""
    for key in section if isinstance(section, dict) else ():
        if key in RENAMED_TRAIN_KEYS:
            raise ConfigError(f"{where}.{key}: renamed; write {where}.{RENAMED_TRAIN_KEYS[key]}")


def _expand(value: Any, key: str) -> Any:
    return {key: value} if isinstance(value, str) else value


def _techniques(raw: Any, train: TrainConfig, tuning: TuningConfig | None) -> dict[str, TechniqueEntry]:
    """Each entry's name, kind, ``train`` overrides (checked against the train section) and own
    ``tuning:`` range (checked against the tuning section); its other keys are the kind's options,
    left to the technique plug-in."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("techniques: expected a mapping name → {kind: ...}, e.g. {lora: {kind: lora}}")
    train_hints = typing.get_type_hints(TrainConfig)
    entries: dict[str, TechniqueEntry] = {}
    for name, entry in raw.items():
        name = str(name)
        if not NAME_PATTERN.match(name):
            fail(f"techniques.{name}", name, "a name of letters, digits, '-', '_' or '.' (it names a folder)")
        if entry is not None and not isinstance(entry, dict):
            fail(f"techniques.{name}", entry, "a mapping such as {kind: lora, rank: 4}")
        entry = dict(entry or {})
        _refuse_renamed(f"techniques.{name}", entry)
        kind = entry.pop("kind", name)
        if not isinstance(kind, str):
            fail(f"techniques.{name}.kind", kind, "a technique name")
        overrides = {
            key: coerce(entry.pop(key), train_hints[key], f"techniques.{name}.{key}")
            for key in list(entry)
            if key in train_hints
        }
        dataclasses.replace(train, **overrides).validate()
        quantize = _quantize_override(entry.pop("quantize"), f"techniques.{name}.quantize") if "quantize" in entry else {}
        own_tuning = entry.pop("tuning", None)
        technique_tuning(own_tuning, name, tuning)
        entries[name] = TechniqueEntry(
            name=name, kind=kind, options=entry, train_overrides=overrides, quantize=quantize, tuning=own_tuning
        )
    return entries


def _quantize_override(raw: Any, where: str) -> dict[str, Any]:
    """A technique's ``quantize:``: the keys it gives replace model.quantize's for this technique
    (``null`` for a key: that component in full precision; ``quantize: null``: nothing quantised)."""
    if raw is None:
        return {f.name: None for f in dataclasses.fields(QuantizeConfig)}
    given = build(QuantizeConfig, raw, where)  # (bitsandbytes itself: checked at the start of a run, preflight)
    return {key: getattr(given, key) for key in raw}
