"""Full fine-tuning: every UNet weight trains (and the text encoder's, if asked).

The result is a complete diffusers pipeline folder (the study's "classic fine-tuning"); with
``use_ema`` the saved UNet holds the EMA weights, as in diffusers' train_text_to_image.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.techniques.base import TECHNIQUES, Technique, files_under

if TYPE_CHECKING:
    from sdtune.models import ModelBundle

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@TECHNIQUES.register("full")
class FullFineTuning(Technique):
    kind = "full"
    saves_frozen_parts = True  # a whole pipeline folder

    def make_trainable(self, bundle: ModelBundle) -> None:
        bundle.unet.requires_grad_(True)
        if self.options.train_text_encoder:
            bundle.text_encoder.requires_grad_(True)

    def save(self, bundle: ModelBundle, out_dir: Path) -> dict[str, list[str]]:
        pipe = bundle.family.build_pipeline(bundle)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        parts = {part: files_under(out_dir, [out_dir / part]) for part in PIPELINE_PARTS}
        parts["pipeline"] = files_under(out_dir, [out_dir / "model_index.json"])
        return parts

    @classmethod
    def own_pipeline(cls, run_dir: Path) -> bool:
        return (run_dir / "model_index.json").exists()

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        return pipe  # the run folder itself is the pipeline; see own_pipeline
