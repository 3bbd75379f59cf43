"""Full fine-tuning: every denoiser weight trains (and the text encoders', if asked).

The result is a complete diffusers pipeline folder (the study's "classic fine-tuning"); with
``use_ema`` the saved UNet holds the EMA weights, as in diffusers' train_text_to_image.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.config import ModelConfig
from sdtune.models import FAMILIES, Model
from sdtune.techniques.base import TECHNIQUES, Technique, files_under


@TECHNIQUES.register("full")
class FullFineTuning(Technique):
    kind = "full"
    saves_frozen_parts = True  # a whole pipeline folder

    def make_trainable(self, model: Model) -> None:
        model.denoiser.requires_grad_(True)
        for name in self.text_encoders_to_train(model):
            model.components[name].requires_grad_(True)

    def save(self, model: Model, out_dir: Path) -> dict[str, list[str]]:
        pipe = model.pipeline()
        pipe.save_pretrained(out_dir, safe_serialization=True)
        parts = {p.name: files_under(out_dir, [p]) for p in sorted(out_dir.iterdir()) if p.is_dir() and p.name in pipe.config}
        parts["pipeline"] = files_under(out_dir, [out_dir / "model_index.json"])
        return parts

    def loads_in(self, part: str, family: str) -> list[str]:
        """Which tools read the files of a record part (``outputs.<part>.loads_in`` of the record): the
        folder is a diffusers pipeline; `sdtune export RUN --single-file` writes the A1111/ComfyUI checkpoint."""
        return [f"diffusers {FAMILIES.get(family).pipeline_class_name}.from_pretrained", "sdtune generate"]

    @classmethod
    def restore(cls, model: Model, run_dir: Path, options: dict[str, Any]) -> Model:
        return type(model).load(ModelConfig(path=str(run_dir)))  # the run folder holds the trained model

    @classmethod
    def own_pipeline(cls, run_dir: Path) -> bool:
        return (run_dir / "model_index.json").exists()

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        return pipe  # the run folder itself is the pipeline; see own_pipeline
