"""DINOv2 image embeddings for the DreamBench-style DINO score and peft's drift.

Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision". The embedding is
the pooled (layer-normed CLS) output of ``transformers.Dinov2Model``, L2-normalised, as the peft
image-generation benchmark (``method_comparison/image-gen``) uses it; images are prepared by the
model's own image processor (resize, centre crop, ImageNet normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.errors import one_line
from sdtune.metrics.errors import MetricUnavailable


class DinoEncoder:
    """A DINOv2 model and its image processor; :meth:`image_embeddings` gives unit row vectors."""

    def __init__(self, model, processor, device: str | torch.device | None = None, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.processor = processor
        self.batch_size = batch_size

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 32) -> DinoEncoder:
        """Load a DINOv2 model and its processor from a hub id or a local folder; a model that cannot
        be had raises :class:`MetricUnavailable` with one line saying how to provide it."""
        from transformers import AutoImageProcessor, Dinov2Model

        try:
            model = Dinov2Model.from_pretrained(name_or_path)
            processor = AutoImageProcessor.from_pretrained(name_or_path)
        except Exception as error:  # any failure means: this model cannot be had here
            where = "" if Path(name_or_path).expanduser().is_dir() else " (and no local folder of that name)"
            raise MetricUnavailable(
                f"DINOv2 model {name_or_path!r} could not be loaded{where}: {one_line(error)}; download it "
                "once where there is network (e.g. `hf download facebook/dinov2-small --local-dir ./dinov2`) "
                "and set evaluation.dino_model to that folder"
            ) from error
        return cls(model, processor, device=device, batch_size=batch_size)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised embeddings, shape ``(len(images), hidden_size)``."""
        if len(images) == 0:
            raise ValueError("image_embeddings: no images")
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            pooled = self.model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output.float()
            chunks.append((pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy())
        return np.concatenate(chunks)
