"""Model families: one :class:`Model` subclass per family, registered in :data:`FAMILIES`.

A family is separate from a technique: any technique trains any family. Add one with a module
``models/<family>.py`` that registers a :class:`Model` subclass, an import line below, and its
export names in :mod:`sdtune.formats.families`.
"""

from sdtune.models import sd1, sd3, sdxl  # noqa: F401  (register the families)
from sdtune.models.base import FAMILIES, Conditioning, Model
from sdtune.models.detect import detect_family_name, model_class
from sdtune.models.files import ModelLoadError, read_model_json

__all__ = ["FAMILIES", "Conditioning", "Model", "ModelLoadError", "detect_family_name", "model_class", "read_model_json"]
