"""Model families: how to load a base model's parts, encode text and scale latents.

A family is separate from a technique: any technique trains any family. Add one with a module
``models/<family>.py`` that registers a :class:`ModelFamily` subclass in :data:`FAMILIES`.
"""

from sdtune.models import sd1  # noqa: F401  (registers the family)
from sdtune.models.base import FAMILIES, ModelBundle, ModelFamily, ModelLoadError, family_for

__all__ = ["FAMILIES", "ModelBundle", "ModelFamily", "ModelLoadError", "family_for"]
