"""Checks before any work: what a command that trains can validate without loading a model or
decoding an image, so that a mistake ends in one line *before* anything the user has is touched.

The experiment file was checked when it was read (:mod:`sdtune.config`: values, local paths) and
resolved (:func:`sdtune.experiment.resolve`: the family against the model folder, technique
options against the family). What is left needs the command's own arguments or a look at the
world, and is checked here, in this order:

1. the names the command was given (``--technique``, ``--only``, ``--seeds``);
2. the output: a folder this process can write in; each run folder not a file, and not a finished
   run unless the command may replace or reuse it;
3. the data: the rows of ``data.source`` and of the validation split are listed (no image is
   decoded: that is the loader's job, with ``data.on_bad_image``), the held-out split is drawn, and
   each technique sees the captions it needs (textual inversion: its placeholder);
4. the launch: a world size without a rendezvous, a sharding config on one process, more processes
   than there is work for, and options that need a CUDA GPU on a machine without one.

:func:`check_training` is the preflight of every command that trains one or more techniques of
an experiment (``sdtune train``); :func:`check_comparison` adds what ``compare`` needs and
:func:`check_tuning` what ``tune`` needs (its output folder is not another command's). The commands that read a finished run check it where they read it
(:mod:`sdtune.generation`, :mod:`sdtune.export`, :mod:`sdtune.report`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sdtune import records
from sdtune.config import QUANTIZATION_INSTALL, ConfigError, QuantizeConfig, TrainConfig, held_out_rows
from sdtune.data import layouts
from sdtune.data.dataset import caption_text, caption_values, load_rows
from sdtune.errors import UserError
from sdtune.experiment import Experiment, output_root
from sdtune.util.device import on_cpu
from sdtune.util.distributed import (
    DistributedSetupError,
    check_launch_environment,
    launch_command,
    launched_processes,
    requested_sharding,
)
from sdtune.util.paths import OutputPathError, check_writable_folder

# train keys that do not change what a run learns: a finished run is the same run whichever they are
RUN_NEUTRAL_TRAIN_KEYS = ("log_every", "checkpointing_steps", "checkpoints_total_limit", "keep_freed_cpu_memory")
RUN_NEUTRAL_DATA_KEYS = ("cache", "cache_memory_limit_gb", "num_workers")
SHARDING_NAMES = {"fsdp": "FSDP2", "deepspeed": "DeepSpeed"}


class RunExistsError(UserError, RuntimeError):
    """The run folder holds a finished (or resumable) run; the message says how to proceed."""


# -- 1. names ----------------------------------------------------------------------------------------
def technique_names(experiment: Experiment, requested: str | Iterable[str] | None, key: str) -> list[str]:
    """The techniques a command was asked for (all of the experiment's when none), each checked; a
    comma-separated string names several (``--only full,lora``)."""
    if requested is None or requested == []:
        return list(experiment.techniques)
    names = requested.split(",") if isinstance(requested, str) else [n for item in requested for n in item.split(",")]
    names = [name.strip() for name in names]
    for name in names:
        if name not in experiment.techniques:
            raise ConfigError(
                f"{key} {name!r} is not a technique of the experiment; it has: {', '.join(experiment.techniques)}"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{key}: {duplicates[0]!r} is named twice; name each technique once")
    return names


def check_seeds(seeds: list[int] | None) -> None:
    """``--seeds``: each seed once (a repeated seed would train and evaluate the same run twice)."""
    if seeds is not None and not seeds:
        raise ConfigError("--seeds: no seed given; give a comma-separated list such as 0,1,2, or leave --seeds out")
    repeated = sorted({seed for seed in seeds or [] if seeds.count(seed) > 1})
    if repeated:
        raise ConfigError(f"--seeds: {repeated[0]} is listed twice; list each seed once, e.g. 0,1,2")


# -- 2. the output -----------------------------------------------------------------------------------
def output_key(experiment: Experiment, output_dir: str | Path | None) -> str:
    """How the user named the output folder, for messages."""
    return "--output" if output_dir else "output_dir" if experiment.output_dir else f"the output folder runs/{experiment.name}"


def check_run_folder(run_dir: Path, resume: str | bool | None, overwrite: bool, key: str) -> None:
    """``run_dir`` may be trained into: not a file, and not a finished run unless it may be replaced
    (``overwrite``) or skipped (``resume``); a broken record is one line (:mod:`sdtune.records`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputPathError(f"{key}: {str(run_dir)!r} is a file where the run's folder goes; move it, or choose another --output")
    record = records.read_record(run_dir) if run_dir.is_dir() else None
    if record is not None and record.get("status") == "finished" and not (overwrite or resume):
        raise RunExistsError(f"{run_dir} holds a finished run; pass --overwrite to replace it or --output to write elsewhere")


def reuse_mismatch(record: dict[str, Any], experiment: Experiment, name: str) -> str | None:
    """Where a finished run's record differs from what ``experiment`` would train as technique
    ``name`` (``"train.learning_rate: 0.001 there, 0.0005 here"``), or None when it is the same run.
    Keys that change nothing the run learns are left out (:data:`RUN_NEUTRAL_TRAIN_KEYS`)."""
    there, here = record.get("config") or {}, experiment.to_dict()
    prior = experiment.train_config_for(name).prior_preservation or (record.get("train") or {}).get("prior_preservation")
    sections = {
        "model": ((there.get("model") or {}), here["model"], ()),
        "data": (_held_out(there.get("data") or {}), _held_out(here["data"]), RUN_NEUTRAL_DATA_KEYS),
        "train": (record.get("train") or {}, dataclasses.asdict(experiment.train_config_for(name)), RUN_NEUTRAL_TRAIN_KEYS),
        "dreambooth": (  # (the class images shape only the runs with prior preservation)
            there.get("dreambooth") or {} if prior else {}, here.get("dreambooth") or {} if prior else {}, (),
        ),
        f"techniques.{name}": (
            _without((there.get("techniques") or {}).get(name) or {}, TrainConfig),
            _without(here["techniques"][name], TrainConfig), (),
        ),
    }
    for section, (old, new, neutral) in sections.items():
        for key in sorted(set(old) | set(new)):
            if key not in neutral and old.get(key) != new.get(key):
                return f"{section}.{key}: {old.get(key)!r} there, {new.get(key)!r} here"
    return None


def _held_out(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``validation`` only where it takes rows out of training (a fraction); a separate
    validation source changes what is measured, not what trains."""
    validation = data.get("validation")
    fraction = isinstance(validation, (int, float)) or (isinstance(validation, dict) and "fraction" in validation)
    return data if fraction else {key: value for key, value in data.items() if key != "validation"}


def _without(entry: dict[str, Any], config: type) -> dict[str, Any]:
    """A technique entry without its train overrides (compared through the run's own train section)."""
    train_keys = {f.name for f in dataclasses.fields(config)}
    return {key: value for key, value in entry.items() if key not in train_keys}


# -- 3. the data -------------------------------------------------------------------------------------
def check_data(experiment: Experiment, names: list[str]) -> int | None:
    """List the training rows and the validation split (no image decoded) and check each technique's
    captions; the number of rows that train (None for a stream not yet on disk: its length is
    known only once it has streamed)."""
    data = experiment.data
    if data.streaming or layouts.is_webdataset(data.source):
        return None  # (the source and max_samples were checked at load; the stream is read once, by the loader)
    dataset, _, caption_column, _ = load_rows(data)
    held_out = set(held_out_rows(experiment.validation, len(dataset)))
    split = experiment.validation
    if split is not None and split.source is not None and not layouts.is_webdataset(split.source):
        validation = dataclasses.replace(data, source=split.source, split=split.split, max_samples=split.max_samples,
                                         validation=None, streaming=False)
        try:
            load_rows(validation)
        except UserError as error:  # (its messages name data.source: here it is the validation source)
            raise type(error)(str(error).replace("data.source", "data.validation", 1)) from None
    captions = [
        data.caption_prefix + caption_text(value) + data.caption_suffix
        for row, value in enumerate(caption_values(data, dataset, caption_column)) if row not in held_out
    ]
    for name in names:
        experiment.techniques[name].build().check_captions(captions)  # (textual inversion: its placeholder)
    return len(captions)


# -- 4. the launch -----------------------------------------------------------------------------------
def check_launch(experiment: Experiment, names: list[str], items: int | None, what: str = "training images") -> None:
    """Launcher and device misuse, each one line with the command to run instead."""
    check_launch_environment()
    processes = launched_processes()
    sharding = requested_sharding()
    if sharding and processes == 1 and on_cpu():
        variable = "ACCELERATE_USE_FSDP" if sharding == "fsdp" else "ACCELERATE_USE_DEEPSPEED"
        launcher = "accelerate launch --config_file CONFIG --num_processes"
        raise DistributedSetupError(
            f"{variable} asks for {SHARDING_NAMES[sharding]} sharding but one process was launched, which has "
            f"nothing to share its weights with; launch several (`{launch_command('N', launcher)}`), or unset "
            f"{variable} to train in one process"
        )
    if sharding == "fsdp" and processes > 1 and os.environ.get("FSDP_VERSION", "1") != "2":  # (accelerate's default: 1)
        raise DistributedSetupError(
            "FSDP1 is not supported (its flat parameters break saving the trained tensors by name); set fsdp_version: 2 "
            "in the accelerate config (or FSDP_VERSION=2)"
        )
    if sharding and processes > 1:
        for name in names:
            problem = sharded_option_problem(experiment.train_config_for(name), SHARDING_NAMES[sharding])
            if problem:
                raise DistributedSetupError(problem)
    if items is not None and processes > items:
        raise DistributedSetupError(
            f"{processes} processes were launched for {items} {what}: the processes beyond {items} would have "
            f"nothing of their own to do; launch at most {items} (`{launch_command(items)}`)"
        )
    for name in names:
        item = experiment.techniques[name]
        check_device_options(
            experiment.train_config_for(name), f"techniques.{name}" if len(names) > 1 else "train",
            item.model.quantize, f"techniques.{name}.quantize" if item.quantize_overrides else "model.quantize",
        )


def sharded_option_problem(config: TrainConfig, what: str) -> str | None:
    """Why a train section cannot run sharded (FSDP2, DeepSpeed), or None."""
    if config.compile:
        return f"train.compile: true is not supported with {what}; set train.compile: false"
    if config.optimizer != "adamw":
        return f"train.optimizer: {config.optimizer!r} is not supported with {what} (sharded parameters); use adamw"
    for saver in ("fused_backward", "optimizer_offload", "block_swap"):
        if getattr(config, saver):
            return f"train.{saver} is not supported with {what} (it moves or steps whole tensors); turn it off"
    return None


def check_device_options(
    config: TrainConfig, where: str = "train", quantize: QuantizeConfig | None = None, quantize_key: str = "model.quantize"
) -> None:
    """Options that need an optional package, a CUDA GPU or a compiler, refused where there is none (at
    the start of a run, not at load: `--plan` and `--estimate` work on a machine without them);
    ``quantize``: the technique's quantised base (bitsandbytes), written at ``quantize_key``."""
    if quantize is not None and quantize.active and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{quantize_key}: quantised components need bitsandbytes; {QUANTIZATION_INSTALL}, or remove {quantize_key}"
        )
    cuda = torch.cuda.is_available() and not on_cpu()
    # a CUDA-only saver without CUDA is refused for that when the run starts (savers.check_device), never
    # for a package whose install would not make it run here
    paged = config.optimizer.startswith("paged_")
    if config.optimizer != "adamw" and (cuda or not paged) and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{where}.optimizer: {config.optimizer!r} needs bitsandbytes; pip install 'sdtune[bnb]' or use adamw")
    if config.optimizer_offload and cuda and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"{where}.optimizer_offload: true needs torchao; pip install 'sdtune[offload]' or set it to false")
    if config.mixed_precision == "fp16" and not cuda:
        raise ConfigError(f"{where}.mixed_precision: 'fp16' needs a CUDA GPU; use 'bf16' or 'no' here")
    if config.compile:
        if cuda and importlib.util.find_spec("triton") is None:
            raise ConfigError(f"{where}.compile: true needs triton on a GPU (torch inductor); pip install triton, or set it to false")
        if not cuda and not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
            raise ConfigError(
                f"{where}.compile: true on the CPU needs a C++ compiler (torch inductor builds kernels with it); "
                "install g++, or set it to false"
            )


# -- the commands' preflights ------------------------------------------------------------------------
def check_training(
    experiment: Experiment,
    techniques: str | Iterable[str] | None = None,
    output_dir: str | Path | None = None,
    resume: str | bool | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Everything a training command can check before it loads a model: the technique names, the
    output, the data listing, the launch; returns the techniques to train. Raises a :class:`UserError`."""
    check_launch_environment()  # (how the command was started comes before what it was given)
    names = technique_names(experiment, techniques, "--technique")
    root, key = output_root(experiment, output_dir), output_key(experiment, output_dir)
    check_writable_folder(root, key)
    for name in names:
        check_run_folder(root / name, resume, overwrite, key)
    items = check_data(experiment, names)
    check_launch(experiment, names, items)
    return names


def check_comparison(
    experiment: Experiment,
    output_dir: str | Path | None = None,
    seeds: list[int] | None = None,
    only: str | Iterable[str] | None = None,
    evaluate_only: bool = False,
    data: bool = True,
) -> list[str]:
    """:func:`check_training` for ``sdtune compare`` (``--only``, ``--seeds``, ``--evaluate-only``),
    and every finished run it would reuse checked to be a run of this experiment; returns the techniques.
    ``data=False`` (``--plan``: the runs train elsewhere, where the data is reached and checked): the
    data is not listed."""
    check_launch_environment()
    names = technique_names(experiment, only, "--only")
    check_seeds(seeds)
    root, key = output_root(experiment, output_dir), output_key(experiment, output_dir)
    if evaluate_only and not root.is_dir():
        raise OutputPathError(
            f"--evaluate-only: {str(root)!r} is not a folder; give the output folder the runs were trained into (--output)"
        )
    check_writable_folder(root, key)
    for seed in seeds or [experiment.train.seed]:
        seeded = experiment.with_seed(seed)
        for name in names:
            run_dir = (root if seeds is None else root / f"seed-{seed}") / name
            check_run_folder(run_dir, resume=True, overwrite=False, key=key)
            record = records.read_record(run_dir) if run_dir.is_dir() else None
            difference = record and record.get("status") == "finished" and reuse_mismatch(record, seeded, name)
            if difference:
                raise RunExistsError(
                    f"{run_dir} holds a finished run of another experiment ({difference}); compare into another "
                    "--output, or delete that run folder to train it again"
                )
    items = check_data(experiment, names) if data and not evaluate_only else None
    check_launch(experiment, [] if evaluate_only else names, items)
    check_launch(experiment, [], len(experiment.plan.pairs()), "evaluation images (prompts × seeds_per_prompt)")
    return names


# files and folders only a tuning study writes at the top of its output folder (sdtune.tuning)
TUNING_ENTRIES = ("tuning.json", "trials", "finals", "ray", "report.md", "report.html", "report_files")


def check_tuning(
    experiment: Experiment, output_dir: str | Path | None = None, only: str | Iterable[str] | None = None,
    data: bool = True,
) -> list[str]:
    """:func:`check_training` for ``sdtune tune``: ``--only``, the output folder (writable, and not the
    output of another command, whose report a tuning report would replace), the data listing and the
    launch; returns the techniques, in the experiment's order. Whether a folder that holds a tuning
    study holds *this* study, and each trial's folder, is checked by :mod:`sdtune.tuning` (it knows
    their layout). ``data=False`` (``--plan``: the runs train elsewhere): the data is not listed."""
    check_launch_environment()
    requested = set(technique_names(experiment, only, "--only"))
    names = [name for name in experiment.techniques if name in requested]
    root, key = output_root(experiment, output_dir), output_key(experiment, output_dir)
    check_writable_folder(root, key)
    if root.is_dir() and not (root / TUNING_ENTRIES[0]).exists():
        foreign = sorted(  # a comparison (records/, its report) or a run of `sdtune train` (record.json)
            entry.name for entry in root.iterdir()
            if entry.name in ("records", "report.html", "report.md") or (entry / records.RECORD_FILE).is_file()
        )
        if foreign:
            raise RunExistsError(
                f"{key}: {root} holds the output of another command ({', '.join(foreign[:3])}), not a tuning study; "
                "give --output a new or empty folder (nothing there is changed)"
            )
    items = check_data(experiment, names) if data else None
    check_launch(experiment, names, items)
    return names
