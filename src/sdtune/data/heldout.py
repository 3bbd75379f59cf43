"""Real images outside the training stream, read by one loader: the validation split (never trained
on: its loss during training, and the metrics' references) and, where there is none, training
images as the metrics' references."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdtune.config import DataConfig, ValidationSplit, held_out_rows
from sdtune.data.dataset import caption_text, decode_image, load_rows


@dataclass(frozen=True)
class RealImage:
    """One decoded image (RGB, as stored) and its caption."""

    image: Image.Image
    caption: str


def validation_images(data: DataConfig, split: ValidationSplit, limit: int) -> list[RealImage]:
    """The first ``limit`` rows of the validation split that decode (unreadable ones are skipped, as
    in training): the held-out rows of ``data.source``, or the rows of its separate source."""
    if split.source is not None:
        source = dataclasses.replace(data, source=split.source, split=split.split, max_samples=split.max_samples, validation=None)
        dataset, image_column, caption_column, base_dir = load_rows(source)
        rows = list(range(len(dataset)))
    else:
        dataset, image_column, caption_column, base_dir = load_rows(data)
        rows = held_out_rows(split, len(dataset))
    return _decoded(data, dataset, image_column, caption_column, base_dir, rows[:limit])


def reference_images(data: DataConfig, split: ValidationSplit | None, limit: int) -> tuple[list[RealImage], str]:
    """The images the metrics compare with, and which set they are: the validation split's when there
    is one, else the training images."""
    if split is not None:
        return validation_images(data, split, limit), "validation"
    dataset, image_column, caption_column, base_dir = load_rows(data)
    return _decoded(data, dataset, image_column, caption_column, base_dir, list(range(len(dataset)))[:limit]), "training"


def _decoded(data: DataConfig, dataset: Any, image_column: str, caption_column: str | None, base_dir: Any, rows: list[int]) -> list[RealImage]:
    found = []
    for row in rows:
        try:
            image = decode_image(dataset[row][image_column], base_dir)
        except Exception:
            continue  # unreadable: skipped, as training skips it
        caption = data.instance_prompt if caption_column is None else caption_text(dataset[row][caption_column])
        found.append(RealImage(image, caption or ""))
    return found
