"""The anatomy of a weight change: what a technique changed in the model, and where.

:mod:`.maths` (pure: norms, ranks, effective rank, intruder dimensions), :mod:`.layers` (the changed
matrices of a model, adapters merged through peft), :mod:`.compute` (per layer, per block, in total:
the typed :class:`sdtune.records.Anatomy`), :mod:`.files` (ΔW of a LoRA/LyCORIS file) and
:mod:`.runs` (``sdtune anatomy``). The training loop records it for every finished run.
"""

from sdtune.anatomy.compute import base_lookup, model_anatomy
from sdtune.anatomy.runs import weight_anatomy

__all__ = ["base_lookup", "model_anatomy", "weight_anatomy"]
