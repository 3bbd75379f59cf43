"""The experiment file: typed, frozen sections, checked when the file is read.

:func:`read_experiment_file` gives an :class:`ExperimentConfig` (values checked, paths resolved);
:func:`sdtune.experiment.resolve` joins it with the registries (families, techniques, metrics).
"""

from sdtune.config.load import apply_override, config_from_dict, read_experiment_file
from sdtune.config.paths import looks_like_local_path, resolve_local
from sdtune.config.schema import ConfigError, build, coerce
from sdtune.config.sections import (
    QUANTIZATION_INSTALL,
    DataConfig,
    DreamBoothConfig,
    EvaluationConfig,
    ExperimentConfig,
    ModelConfig,
    QuantizeConfig,
    TechniqueEntry,
    TrainConfig,
)
from sdtune.config.split import ValidationSplit, held_out_rows, parse_validation
from sdtune.config.tuning import VALIDATION_LOSS, TuningConfig, learning_rate_grid, technique_tuning

__all__ = [
    "QUANTIZATION_INSTALL", "ConfigError", "DataConfig", "DreamBoothConfig", "EvaluationConfig", "ExperimentConfig",
    "ModelConfig", "QuantizeConfig", "TechniqueEntry", "TrainConfig", "TuningConfig", "VALIDATION_LOSS", "ValidationSplit",
    "apply_override", "build", "coerce", "config_from_dict", "held_out_rows", "learning_rate_grid", "looks_like_local_path",
    "parse_validation", "read_experiment_file", "resolve_local", "technique_tuning",
]
