"""Training one technique: the loop (:mod:`.loop`), its setup (:mod:`.setup`), inputs (:mod:`.inputs`),
loss (:mod:`.step`), optimizer (:mod:`.optim`), checkpoints (:mod:`.checkpoint`, :mod:`.resume`),
state (:mod:`.state`), outputs and record (:mod:`.finish`, :mod:`.record`), sharding, EMA, DreamBooth's
prior preservation and evaluation during training."""

from sdtune.training.checkpoint import CheckpointError
from sdtune.training.loop import (
           NonFiniteLossError,
           TrainResult,
           check_finite_loss,
           output_root,
           train_technique,
)
from sdtune.training.optim import has_fused_adamw
from sdtune.training.run_dir import RunExistsError

__all__ = ["CheckpointError", "NonFiniteLossError", "check_finite_loss", "RunExistsError", "TrainResult", "has_fused_adamw", "output_root",
           "train_technique"]
