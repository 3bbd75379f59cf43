"""sdtune: fine-tune Stable Diffusion with several techniques and compare them honestly.

The public API, each one import away (the ``sdtune`` command is one call of these per subcommand):

- :func:`load_experiment` (``path, overrides``) → :class:`Experiment`: the experiment file read,
  checked and resolved (family, technique options, per-technique train settings, evaluation plan);
  :func:`experiment_from_dict` the same from a mapping;
- :func:`train` (``experiment, techniques, output_dir, resume, overwrite``) → the runs' results, each
  technique in a fresh process; :func:`train_technique` one technique in this process (its model kept);
- :func:`estimate_memory` (``experiment, techniques, budget``) → each technique's peak-memory
  estimate before any weight is read, with its breakdown and the savers that fit a budget;
- :func:`compare` (``experiment, output_dir, seeds, only``) → the report's path: train every technique,
  evaluate every model at the same prompts and seeds, render the report; :func:`compare_plan` the
  ``sdtune train`` commands of a comparison, for a cluster scheduler;
- :func:`tune` (``experiment, output_dir, engine, address, max_concurrent, only``) → the report's path:
  each technique's learning rate tuned on the validation split with an equal budget (``tuning:``),
  then final runs over seeds at the chosen and at the shared rate, both evaluated, both tables;
  :func:`tune_plan` its trials and final runs as ``sdtune train`` commands;
- :func:`generate` (``run_dir, prompts, …``) → images of a finished run; :func:`load_run_pipeline` its
  diffusers pipeline;
- :func:`render_report` (``output_dir``) → the report re-rendered from the records alone;
  :func:`summary_table` the terminal table;
- :func:`export_merged` and :func:`export_single_file`: a run as a diffusers folder with its weights
  folded in, or one original-layout checkpoint for A1111/ComfyUI; :func:`check_export_targets` checks
  both targets before either is written;
- :func:`check_training`, :func:`check_comparison` and :func:`check_tuning`: the preflight of every
  command that trains (names, output, data listing, launch), run by :func:`train`/:func:`compare`/
  :func:`tune` before any work;
- :func:`weight_anatomy` (``source, base, out``) → (record, path): what a run, or a LoRA/LyCORIS file,
  changed in the base model's weights (norms, ranks, intruder dimensions, per layer, block and in total);
- :class:`UserError`: the base of every error whose message names the bad input and the fix.

Plug-in points: :mod:`sdtune.techniques` (``TECHNIQUES``), :mod:`sdtune.models` (``FAMILIES``) and
:mod:`sdtune.metrics` (``register_metric``). See docs/architecture.md for the layers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # public name → the module that defines it (imported on first use)
    "Experiment": "sdtune.experiment",
    "load_experiment": "sdtune.experiment",
    "experiment_from_dict": "sdtune.experiment",
    "train": "sdtune.runner",
    "train_technique": "sdtune.training",
    "estimate_memory": "sdtune.training.estimate",
    "compare": "sdtune.comparison",
    "compare_plan": "sdtune.comparison",
    "tune": "sdtune.tuning",
    "tune_plan": "sdtune.tuning",
    "generate": "sdtune.generation",
    "load_run_pipeline": "sdtune.generation",
    "render_report": "sdtune.report",
    "summary_table": "sdtune.report",
    "export_merged": "sdtune.export",
    "export_single_file": "sdtune.export",
    "weight_anatomy": "sdtune.anatomy",
    "check_export_targets": "sdtune.export",
    "check_training": "sdtune.preflight",
    "check_comparison": "sdtune.preflight",
    "check_tuning": "sdtune.preflight",
    "UserError": "sdtune.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sdtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
