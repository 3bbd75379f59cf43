"""Model families: how to load a base model's components, condition it and call its denoiser.

A family is separate from a technique: any technique trains any family. Add one with a module
``models/<family>.py`` that registers a :class:`ModelFamily` subclass in :data:`FAMILIES`, and an
import line below.
"""

from sdtune.models import sd1, sd3, sdxl  # noqa: F401  (register the families)
from sdtune.models.base import (
    FAMILIES,
    Conditioning,
    ModelBundle,
    ModelFamily,
    ModelLoadError,
    detect_family_name,
    family_for,
)

__all__ = [
    "FAMILIES", "Conditioning", "ModelBundle", "ModelFamily", "ModelLoadError", "detect_family_name", "family_for",
]
