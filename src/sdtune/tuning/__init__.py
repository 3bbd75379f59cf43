"""``sdtune tune``: each technique's learning rate tuned on the validation split with an equal budget,
then final runs at the chosen and at the shared rate (:mod:`.study`); the trials and finals
(:mod:`.plan`), one run's job (:mod:`.jobs`), the selection (:mod:`.select`), and the engines:
sdtune's own processes (:mod:`.local`) or Ray (:mod:`.ray_engine`, an optional extra)."""

from sdtune.tuning.study import TuningInterrupted, TuningMismatch, tune, tune_plan

__all__ = ["TuningInterrupted", "TuningMismatch", "tune", "tune_plan"]
