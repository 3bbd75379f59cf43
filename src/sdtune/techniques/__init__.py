"""Techniques: plug-ins of the one training loop. Add one as ``techniques/<name>.py`` that
registers a :class:`Technique` subclass in :data:`TECHNIQUES`."""

from sdtune.techniques import adapter, full, oft, partial, textual_inversion  # noqa: F401,E402  (register the techniques)
from sdtune.techniques.base import (
    TECHNIQUES,
    Technique,
    TrainedEvidence,
    WeightsDoNotFit,
    count_parameters,
    trainable_named_parameters,
)

__all__ = [
    "TECHNIQUES", "Technique", "TrainedEvidence", "WeightsDoNotFit", "count_parameters", "trainable_named_parameters",
]
