"""Evaluating models: one model → its images at the plan's prompts × seeds → metrics → an eval record."""

from sdtune.evaluation.evaluate import (
    BASE_LABEL,
    IMAGES_DIR,
    RECORDS_DIR,
    Encoders,
    Evaluation,
    References,
    Target,
    evaluate_images,
    evaluate_model,
    evaluate_training_steps,
    pipeline_parameters,
    pipeline_sizes,
    reference_images,
)

__all__ = [
    "BASE_LABEL", "IMAGES_DIR", "RECORDS_DIR", "Encoders", "Evaluation", "References", "Target", "evaluate_images",
    "evaluate_model", "evaluate_training_steps", "pipeline_parameters", "pipeline_sizes", "reference_images",
]
