"""The experiment, resolved once: :mod:`sdtune.config`'s checked sections joined with the registries.

:func:`resolve` is the only place where the experiment file meets the model families, the technique
plug-ins and the metrics. It detects the family, fills the defaults that depend on it (the native
resolution, the flow-matching settings), checks each technique's options with its plug-in (typed
options), merges each technique's ``train`` overrides (its own :class:`TrainConfig`), parses the
validation split and builds the evaluation plan. Everything downstream reads the resulting
:class:`Experiment` and never re-derives any of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.config import (
    VALIDATION_LOSS,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    TechniqueEntry,
    TrainConfig,
    ValidationSplit,
    config_from_dict,
    parse_validation,
    read_experiment_file,
    resolve_local,
    technique_tuning,
)
from sdtune.diffusion import FLOW_DEFAULTS, OBJECTIVE_KEYS, ObjectiveSettings
from sdtune.models import FAMILIES, Model, ModelLoadError, detect_family_name, model_class
from sdtune.techniques import TECHNIQUES, Technique
from sdtune.techniques.lora_variants import mutates_base
from sdtune.util.device import on_cpu

# The study's prompt plus a small default set: in the dataset's domain (Pokémon-like creatures) and
# outside it (to measure how much of the base model survives fine-tuning).
DEFAULT_PROMPTS = (
    "yoda", "a cute green dragon", "a blue bird with big eyes", "a fire monster",
    "a photo of a city street at night", "a bowl of fruit on a wooden table", "a portrait of an old man",
)
DEFAULT_IN_DOMAIN = (True, True, True, True, False, False, False)


@dataclass(frozen=True)
class ResolvedTechnique:
    """One technique of the experiment: its plug-in, typed options and own train settings."""

    name: str
    kind: str
    plugin: type[Technique]
    options: Any  # the plug-in's options dataclass, checked
    train: TrainConfig  # the shared section with this technique's overrides (and the family's defaults)
    train_overrides: dict[str, Any]  # the overrides as written (for the experiment file it writes back)
    objective: ObjectiveSettings
    model: ModelConfig  # the shared model section with this technique's `quantize:` applied
    quantize_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # `quantize:` as written

    def build(self) -> Technique:
        """A fresh instance of the plug-in with these options."""
        return self.plugin(self.options)

    def options_dict(self) -> dict[str, Any]:
        """The options as plain values (records, and a plug-in's ``load_into``)."""
        return dataclasses.asdict(self.options)


@dataclass(frozen=True)
class EvaluationPlan:
    """The fixed prompts × seeds every model is sampled at."""

    prompts: tuple[str, ...]
    in_domain: tuple[bool, ...]
    seeds: tuple[int, ...]

    def pairs(self) -> list[tuple[str, int]]:
        return [(prompt, seed) for prompt in self.prompts for seed in self.seeds]

    def pair_in_domain(self) -> list[bool]:
        """Whether each pair of :meth:`pairs` is in the training domain (by position, so a prompt listed
        both in and out of domain keeps each flag where it was listed)."""
        return [domain for domain in self.in_domain for _ in self.seeds]

    def first_seeds(self, count: int | None) -> EvaluationPlan:
        """The same prompts with only the first ``count`` seeds (None: all of them)."""
        return EvaluationPlan(self.prompts, self.in_domain, self.seeds[:count] if count else self.seeds)

    def positions_in(self, whole: EvaluationPlan) -> list[int]:
        """Where each pair of this plan (:meth:`first_seeds` of ``whole``) sits in ``whole.pairs()``."""
        return [p * len(whole.seeds) + whole.seeds.index(seed) for p in range(len(self.prompts)) for seed in self.seeds]


@dataclass(frozen=True)
class TuningPlan:
    """The ``tuning:`` section resolved (``sdtune tune``): each technique's learning rates and the budget
    every technique shares (trials, steps per trial, samples per step), the selection measure and its
    direction, the final runs' seeds."""

    learning_rates: dict[str, tuple[float, ...]]  # technique → its grid, ascending
    steps: int  # optimizer steps of every trial
    grace_steps: int  # asha's first rung; the interval of every trial's validation loss
    reduction_factor: int
    select_by: str
    direction: str  # "lower" or "higher": which selection score is better
    seeds: tuple[int, ...]  # the final runs' training seeds
    scheduler: str  # grid | asha
    rank_by: str  # what the final tables are ranked by
    rank_direction: str
    pareto: tuple[str, str] | None  # [fidelity, drift] metrics of the Pareto plot (None: the first measured)


@dataclass(frozen=True)
class Experiment:
    """A resolved experiment: the checked file (family detected, defaults filled) and what the
    registries made of it."""

    config: ExperimentConfig
    family: type[Model]
    techniques: dict[str, ResolvedTechnique]
    validation: ValidationSplit | None  # data.validation, parsed (None: no validation split)
    plan: EvaluationPlan
    tuning: TuningPlan | None = None  # the tuning: section, resolved (None: the file has none)

    @property
    def training_plan(self) -> EvaluationPlan:
        """What a run generates at ``evaluation.every_steps``: the plan, with the first
        ``evaluation.seeds_per_prompt_during_training`` seeds."""
        return self.plan.first_seeds(self.evaluation.seeds_per_prompt_during_training)

    # -- the file's sections -------------------------------------------------------------------------
    name = property(lambda self: self.config.name)
    model = property(lambda self: self.config.model)
    data = property(lambda self: self.config.data)
    train = property(lambda self: self.config.train)
    evaluation = property(lambda self: self.config.evaluation)
    dreambooth = property(lambda self: self.config.dreambooth)
    output_dir = property(lambda self: self.config.output_dir)
    source_path = property(lambda self: self.config.source_path)

    @property
    def eval_resolution(self) -> int:
        return self.evaluation.resolution or self.data.resolution

    def train_config_for(self, technique: str) -> TrainConfig:
        """The shared ``train`` section with this technique's overrides applied."""
        return self.techniques[technique].train

    def to_dict(self) -> dict[str, Any]:
        """The experiment as resolved (detected family, native resolution, flow defaults, a compare
        seed), as a mapping that :func:`experiment_from_dict` loads back to the same experiment."""
        config = self.config
        return {
            "name": config.name,
            "model": dataclasses.asdict(config.model),
            "data": dataclasses.asdict(config.data),
            "train": dataclasses.asdict(config.train),
            "techniques": {
                name: {
                    "kind": item.kind, **item.plugin.file_options(item.options), **item.train_overrides,
                    **({"quantize": item.quantize_overrides} if item.quantize_overrides else {}),
                    **({"tuning": own} if (own := config.techniques[name].tuning) is not None else {}),
                }
                for name, item in self.techniques.items()
            },
            "evaluation": dataclasses.asdict(config.evaluation),
            **({"dreambooth": dataclasses.asdict(config.dreambooth)} if config.dreambooth else {}),
            **({"tuning": dataclasses.asdict(config.tuning)} if config.tuning else {}),
            **({"output_dir": config.output_dir} if config.output_dir else {}),
        }

    def with_seed(self, seed: int) -> Experiment:
        """The same experiment with another training seed (every technique shares it)."""
        train = dataclasses.replace(self.config.train, seed=seed)
        techniques = {
            name: dataclasses.replace(item, train=dataclasses.replace(item.train, seed=seed))
            for name, item in self.techniques.items()
        }
        return dataclasses.replace(self, config=dataclasses.replace(self.config, train=train), techniques=techniques)

    def with_technique_train(self, name: str, **changes: Any) -> Experiment:
        """The same experiment with keys of one technique's ``train`` set (as overrides of its entry,
        so the file it writes back trains the same), checked like the file's."""
        item = self.techniques[name]
        train = dataclasses.replace(item.train, **changes)
        train.validate()
        changed = dataclasses.replace(item, train=train, train_overrides={**item.train_overrides, **changes})
        return dataclasses.replace(self, techniques={**self.techniques, name: changed})

    def restricted_to(self, names: list[str]) -> Experiment:
        """The same experiment with only the named techniques, in the experiment's order."""
        kept = [name for name in self.techniques if name in names]
        config = dataclasses.replace(self.config, techniques={name: self.config.techniques[name] for name in kept})
        tuning = self.tuning and dataclasses.replace(
            self.tuning, learning_rates={name: self.tuning.learning_rates[name] for name in kept}
        )
        return dataclasses.replace(
            self, config=config, techniques={name: self.techniques[name] for name in kept}, tuning=tuning
        )

    def with_evaluation(self, **changes: Any) -> Experiment:
        """The same experiment with keys of the ``evaluation`` section set (the plan is unchanged)."""
        evaluation = dataclasses.replace(self.config.evaluation, **changes)
        evaluation.validate()
        return dataclasses.replace(self, config=dataclasses.replace(self.config, evaluation=evaluation))


def output_root(experiment: Experiment, output_dir: str | Path | None = None) -> Path:
    """Where an experiment's runs go: ``output_dir`` given, the file's ``output_dir``, or runs/<name>."""
    return Path(output_dir or experiment.output_dir or Path("runs") / experiment.name)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read an experiment YAML file, apply ``key.path=value`` overrides, check and resolve everything."""
    return resolve(read_experiment_file(path, overrides))


def experiment_from_dict(raw: dict[str, Any], source_path: str | None = None, base_dir: Path | None = None) -> Experiment:
    """:func:`load_experiment` for a mapping shaped like an experiment file."""
    return resolve(config_from_dict(raw, source_path, base_dir))


def resolve(config: ExperimentConfig) -> Experiment:
    """Join the checked file with the registries (see the module docstring); every error is one line."""
    family = _family(config)
    data = config.data
    if data.resolution is None:
        data = dataclasses.replace(data, resolution=family.native_resolution(config.model))
    train = _objective_defaults(config.train, family, "train")
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, family=family.family), data=data, train=train
    )
    _check_evaluation(config)
    base_dir = Path(config.base_dir or Path.cwd())
    techniques = {name: _technique(entry, config, family, base_dir) for name, entry in config.techniques.items()}
    _check_prior_preservation(config, techniques)
    return Experiment(
        config=config, family=family, techniques=techniques, validation=parse_validation(data.validation),
        plan=_plan(config), tuning=_tuning(config, techniques),
    )


def _family(config: ExperimentConfig) -> type[Model]:
    """The model's family (detected for ``auto``); keys that only some families have are checked."""
    if config.model.family != "auto" and config.model.family not in FAMILIES:
        raise ConfigError(
            f"model.family: {config.model.family!r} is not allowed; expected auto or one of {', '.join(FAMILIES.names())}"
        )
    try:
        family = model_class(config.model)
    except ModelLoadError as error:
        raise ConfigError(str(error)) from None
    if config.model.family != "auto":
        _check_named_family(config.model, family)
    if not config.model.text_encoder_3 and "text_encoder_3" not in family.text_encoder_names:
        raise ConfigError(f"model.text_encoder_3: only SD3-style families have a third text encoder, not {family.family}")
    return family


def _check_named_family(model: ModelConfig, family: type[Model]) -> None:
    """An explicit ``model.family`` must be the model's own: loading an SD1 folder as SDXL fails deep in
    the pipeline (a missing second tokenizer), and a record would name the wrong family. A model
    whose family cannot be detected (a .ckpt, a hub id offline) is taken at its word."""
    try:
        detected = detect_family_name(model)
    except ModelLoadError:
        return
    if detected != family.family:
        raise ConfigError(
            f"model.family: {family.family!r}, but {model.path!r} is a {FAMILIES.get(detected).pipeline_class_name} "
            f"({detected}); set model.family: auto (or {detected}), or give a model of family {family.family}"
        )


def _objective_defaults(train: TrainConfig, family: type[Model], where: str, given: dict | None = None) -> TrainConfig:
    """Reject keys of the other objective; fill in the flow defaults for flow-matching families."""
    given = dataclasses.asdict(train) if given is None else given
    for objective, keys in OBJECTIVE_KEYS.items():
        if objective == family.objective:
            continue
        for key in keys:
            if given.get(key) is not None:
                owners = [n for n in FAMILIES if FAMILIES.get(n).objective == objective]
                raise ConfigError(
                    f"{where}.{key}: applies to {objective} families ({', '.join(owners)}), not to {family.family} "
                    f"({family.objective}); remove it"
                )
    if family.objective == "flow":
        filled = {k: v for k, v in FLOW_DEFAULTS.items() if getattr(train, k) is None}
        train = dataclasses.replace(train, **filled)
    return train


def _technique(entry: TechniqueEntry, config: ExperimentConfig, family: type[Model], base_dir: Path) -> ResolvedTechnique:
    where = f"techniques.{entry.name}"
    if entry.kind not in TECHNIQUES:
        raise ConfigError(f"{where}.kind: {entry.kind!r} is not a technique; choose one of: {', '.join(TECHNIQUES.names())}")
    if "seed" in entry.train_overrides:
        raise ConfigError(
            f"{where}.seed: every technique of an experiment shares train.seed (the same data order and noise, "
            "and `compare --seeds` sets it for all); remove it, or set train.seed"
        )
    plugin = TECHNIQUES.get(entry.kind)
    raw = dict(entry.options)
    for key in plugin.path_options:  # files, like model/data: relative to the experiment file
        if isinstance(raw.get(key), str):
            raw[key] = resolve_local(raw[key], base_dir)
    options = plugin.validate_options(raw, where)
    plugin.check_family(options, family, where)
    if not config.model.text_encoder_3 and "text_encoder_3" in (getattr(options, "text_encoders", None) or []):
        raise ConfigError(
            f"{where}.text_encoders: 'text_encoder_3' is not loaded (model.text_encoder_3: false); remove it from "
            "text_encoders, or set model.text_encoder_3: true"
        )
    train = dataclasses.replace(config.train, **entry.train_overrides)
    train = _objective_defaults(train, family, where, entry.train_overrides)
    train.validate()
    if train.free_encoders and (config.data.cache == "off" or not config.data.center_crop):
        raise ConfigError(
            f"{where if 'free_encoders' in entry.train_overrides else 'train'}.free_encoders: the encoders can leave only once every input is in the latent cache, which needs "
            "data.center_crop: true and data.cache other than off"
        )
    objective = ObjectiveSettings(**{f.name: getattr(train, f.name) for f in dataclasses.fields(ObjectiveSettings)})
    quantize = dataclasses.replace(config.model.quantize, **entry.quantize)
    item = ResolvedTechnique(
        entry.name, entry.kind, plugin, options, train, dict(entry.train_overrides), objective,
        model=dataclasses.replace(config.model, quantize=quantize), quantize_overrides=dict(entry.quantize),
    )
    _check_quantized(item, family, where)
    return item


def _check_quantized(item: ResolvedTechnique, family: type[Model], where: str) -> None:
    """What cannot train on a quantised component: its weights themselves (full, partial), an adapter
    peft has no quantised layer for, and text encoders (weights or token rows) that are quantised."""
    spec = item.model.quantize
    keep = "set quantize: {denoiser: null} for this technique"
    if spec.denoiser and item.plugin.quantized_denoiser_refused:
        raise ConfigError(f"{where}: quantize.denoiser {spec.denoiser}: {item.plugin.quantized_denoiser_refused}, or {keep}")
    if spec.denoiser and mutates_base(item.options_dict().get("peft", {}).get("init_lora_weights", True)):
        raise ConfigError(
            f"{where}: init_lora_weights {item.options_dict()['peft']['init_lora_weights']!r} rewrites the base weights "
            f"into a residual, and quantize.denoiser {spec.denoiser} keeps them frozen; use init_lora_weights: true, or {keep}"
        )
    if spec.denoiser == "int8" and getattr(item.plugin, "fixed", {}).get("use_dora") and on_cpu():
        raise ConfigError(
            f"{where}: quantize.denoiser int8 with dora does not train on the CPU (peft's DoRA re-creates the int8 "
            f"weight without its scales there); use nf4 for dora on the CPU, or {keep}"
        )
    if spec.denoiser and item.train.block_swap:  # (it keeps CPU masters of the frozen weights at the run's dtype)
        raise ConfigError(
            f"{where}: train.block_swap moves frozen weights as plain tensors, and quantize.denoiser {spec.denoiser} "
            f"stores them packed in 4/8 bits; use one or the other (the quantised denoiser is the smaller), or {keep}"
        )
    trained = item.plugin.trained_text_encoders(item.options, family)
    if spec.text_encoders and trained:
        raise ConfigError(
            f"{where}: trains the text encoders {', '.join(trained)}, which quantize.text_encoders {spec.text_encoders} "
            "loads as frozen 4/8-bit storage; set train_text_encoder: false, or quantize: {text_encoders: null} for "
            "this technique"
        )


def _check_prior_preservation(config: ExperimentConfig, techniques: dict[str, ResolvedTechnique]) -> None:
    """Techniques with prior preservation need the class images' section, and a kind it applies to."""
    for item in techniques.values():
        if not item.train.prior_preservation:
            continue
        where = f"techniques.{item.name}.prior_preservation"
        if config.dreambooth is None:
            raise ConfigError(
                f"{where}: true needs a `dreambooth:` section with the class images' prompt, e.g. "
                "dreambooth: {class_prompt: 'a photo of a toy'}"
            )
        if config.data.buckets is not None:
            raise ConfigError(
                f"{where}: class images are square at data.resolution and cannot join aspect-ratio buckets yet; "
                "set data.buckets: null, or prior_preservation: false"
            )
        if item.plugin.prior_preservation_refused:
            raise ConfigError(f"{where}: {item.plugin.prior_preservation_refused}; set it to false for this technique")


def _check_evaluation(config: ExperimentConfig) -> None:
    """The evaluation keys that name things sdtune looks up: a sampler class, metrics (and their plug-ins)."""
    evaluation = config.evaluation
    if evaluation.scheduler is not None:
        import diffusers

        found = getattr(diffusers, evaluation.scheduler, None)
        if not hasattr(found, "from_config") or "Scheduler" not in evaluation.scheduler:
            raise ConfigError(
                f"evaluation.scheduler: {evaluation.scheduler!r} is not allowed; expected a diffusers scheduler "
                "class, e.g. DDIMScheduler"
            )
    if evaluation.metrics is not None or evaluation.metric_plugins:
        from sdtune.metrics import METRICS, load_plugins  # (heavier than the rest: only when asked)

        load_plugins(evaluation.metric_plugins)
        for name in evaluation.metrics or []:
            if name not in METRICS:
                raise ConfigError(f"evaluation.metrics: {name!r} is not a metric; choose from: {', '.join(METRICS.names())}")


def _tuning(config: ExperimentConfig, techniques: dict[str, ResolvedTechnique]) -> TuningPlan | None:
    """The tuning section with each technique's grid; the measures it names checked against the metric
    registry; the equal budget (samples per step) checked across techniques."""
    tuning = config.tuning
    if tuning is None:
        return None
    samples = {name: item.train.batch_size * item.train.gradient_accumulation_steps for name, item in techniques.items()}
    if len(set(samples.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in samples.items())
        raise ConfigError(
            f"tuning: the budget must be equal, but the techniques train on different samples per step ({listed}); "
            "give every technique the same batch_size × gradient_accumulation_steps"
        )
    rates = {
        name: technique_tuning(config.techniques[name].tuning, name, tuning) or tuning.rates() for name in techniques
    }
    rank_by = tuning.rank_by or tuning.select_by
    return TuningPlan(
        learning_rates=rates, steps=tuning.trial_steps(config.train.max_train_steps),
        grace_steps=tuning.grace(config.train.max_train_steps), reduction_factor=tuning.reduction_factor,
        select_by=tuning.select_by, direction=_measure_direction(config, tuning.select_by, "tuning.select_by", False),
        seeds=tuple(tuning.seeds or [config.train.seed]), scheduler=tuning.scheduler, rank_by=rank_by,
        rank_direction=_measure_direction(config, rank_by, "tuning.rank_by", True),
        pareto=None if tuning.pareto is None else (
            _computed(config, tuning.pareto[0], "tuning.pareto"), _computed(config, tuning.pareto[1], "tuning.pareto")
        ),
    )


def _measure_direction(config: ExperimentConfig, name: str, where: str, on_finals: bool) -> str:
    """Which value of a selection or ranking measure is better: the validation loss's lower, a
    metric's its registered direction (an informational metric cannot choose or rank)."""
    if name == VALIDATION_LOSS:
        return "lower"
    metric = _metric(config, name, where)
    if metric.direction not in ("higher", "lower"):
        raise ConfigError(f"{where}: {name!r} is informational (no better direction); choose validation_loss or a metric such as dino")
    if on_finals:
        _computed(config, name, where)
    return metric.direction


def _computed(config: ExperimentConfig, name: str, where: str) -> str:
    """A metric the final runs' evaluation computes (``evaluation.metrics``, or the default ones)."""
    metric = _metric(config, name, where)
    listed = config.evaluation.metrics
    if (listed is not None and name not in listed) or (listed is None and not metric.default):
        raise ConfigError(f"{where}: {name!r} is not computed by the evaluation; add it to evaluation.metrics")
    return name


def _metric(config: ExperimentConfig, name: str, where: str) -> Any:
    from sdtune.metrics import METRICS, load_plugins  # (heavier than the rest: only when asked)

    load_plugins(config.evaluation.metric_plugins)
    if name not in METRICS:
        raise ConfigError(f"{where}: {name!r} is not a metric; choose validation_loss or one of: {', '.join(METRICS.names())}")
    return METRICS.get(name)


def _plan(config: ExperimentConfig) -> EvaluationPlan:
    """The prompts (the listed ones, the prompts file's — '!' marks an out-of-domain line —, then the
    out-of-domain ones; the default set when none is given) × ``seeds_per_prompt`` seeds."""
    evaluation = config.evaluation
    prompts = list(evaluation.prompts)
    in_domain = [True] * len(prompts)
    if evaluation.prompts_file:
        for line in Path(evaluation.prompts_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out_of_domain = line.startswith("!")
                prompts.append(line[1:].strip() if out_of_domain else line)
                in_domain.append(not out_of_domain)
    prompts += evaluation.out_of_domain_prompts
    in_domain += [False] * len(evaluation.out_of_domain_prompts)
    if not prompts:
        prompts, in_domain = list(DEFAULT_PROMPTS), list(DEFAULT_IN_DOMAIN)
    return EvaluationPlan(tuple(prompts), tuple(in_domain), tuple(range(evaluation.seeds_per_prompt)))
