"""Captioned-image datasets: loading (🤗 datasets), PIL/numpy transforms, deterministic order.

The order of samples, flips and crops is a pure function of (seed, position in the stream), so a
resumed run sees exactly the data an uninterrupted one would, and every technique of an
experiment sees the same data in the same order.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtune.config import DataConfig
from sdtune.errors import UserError
from sdtune.split import held_out_rows, parse_validation

log = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "images", "file_name", "filename", "image_path", "path", "file")
CAPTION_COLUMN_NAMES = ("text", "caption", "captions", "prompt", "description", "label")
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class DataError(UserError, ValueError):
    """The dataset cannot be used as configured; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Loading


def load_rows(config: DataConfig) -> tuple[Any, str, str, Path | None]:
    """Load the dataset; return (dataset with undecoded images, image column, caption column, base dir)."""
    import datasets

    source = Path(config.source).expanduser()
    base_dir: Path | None = None
    try:
        if source.is_dir():
            base_dir = source
            dataset = datasets.load_dataset("imagefolder", data_dir=str(source), split=config.split)
        elif source.is_file():
            builder = FILE_BUILDERS.get(source.suffix.lower())
            if builder is None:
                raise DataError(
                    f"data.source: {str(source)!r} has an unknown file type; use a folder or one of "
                    f"{', '.join(FILE_BUILDERS)}"
                )
            base_dir = source.parent
            dataset = datasets.load_dataset(builder, data_files=str(source), split="train")
        else:
            dataset = datasets.load_dataset(config.source, split=config.split, revision=config.revision)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types; the user needs one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"data.source: could not load {config.source!r} ({first[:200]}); give a local imagefolder "
            "with metadata.jsonl/csv, a .parquet/.jsonl/.csv file, or a reachable hub dataset id"
        ) from error
    if config.max_samples is not None:
        dataset = dataset.select(range(min(config.max_samples, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"data.source: {config.source!r} has no rows (split {config.split!r})")
    image_column = _pick_column(dataset, config.image_column, IMAGE_COLUMN_NAMES, "image", image=True)
    caption_column = _pick_column(dataset, config.caption_column, CAPTION_COLUMN_NAMES, "caption")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset, image_column, caption_column, base_dir


def _pick_column(dataset: Any, wanted: str | None, names: tuple[str, ...], what: str, image: bool = False) -> str:
    import datasets

    columns = list(dataset.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(
                f"data.{what}_column: {wanted!r} is not a column; the dataset has: {', '.join(columns)}"
            )
        return wanted
    if image:
        for column in columns:
            if isinstance(dataset.features[column], datasets.Image):
                return column
    for name in names:
        if name in columns:
            return name
    raise DataError(
        f"no {what} column found; set data.{what}_column to one of: {', '.join(columns)}"
    )


def decode_image(value: Any, base_dir: Path | None) -> Image.Image:
    """An RGB PIL image from a datasets Image value, a path, bytes, or a PIL image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(_resolve(value["path"], base_dir))
    elif isinstance(value, (str, Path)):
        image = Image.open(_resolve(str(value), base_dir))
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    else:
        raise DataError(f"cannot read an image from a value of type {type(value).__name__}")
    image.load()
    return image.convert("RGB")


def _resolve(path: str, base_dir: Path | None) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
        return base_dir / candidate
    return candidate


def caption_text(value: Any) -> str:
    """A caption string; a list of captions (some datasets) gives its first entry."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# Transforms


def transform_image(
    image: Image.Image, resolution: int, crop_top_left: tuple[float, float] | None, flip: bool
) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, crop a square, flip, and scale to [-1, 1].

    ``crop_top_left`` is the crop's position as fractions of the free space (None = centre).
    Returns a float32 tensor of shape (3, resolution, resolution).
    """
    new_size = resized_size(image.size, resolution)
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR)
    top, left = crop_origin(new_size, resolution, crop_top_left)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``resolution``."""
    width, height = size
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def crop_origin(
    resized: tuple[int, int], resolution: int, crop_top_left: tuple[float, float] | None
) -> tuple[int, int]:
    """(top, left) pixel of the square crop in the resized image (fractions of the free space; None = centre)."""
    free_x, free_y = resized[0] - resolution, resized[1] - resolution
    fx, fy = crop_top_left if crop_top_left is not None else (0.5, 0.5)
    return int(round(free_y * fy)), int(round(free_x * fx))


def crop_geometry(
    size: tuple[int, int], resolution: int, crop_top_left: tuple[float, float] | None, flip: bool
) -> tuple[int, int, int, int, int, int]:
    """(original height, original width, crop top, crop left, target height, target width) of a
    training sample: SDXL's micro-conditioning (Podell et al. 2023, §2.2). A flip mirrors the crop's
    left edge, so the numbers describe the image the model sees."""
    resized = resized_size(size, resolution)
    top, left = crop_origin(resized, resolution, crop_top_left)
    if flip:
        left = resized[0] - resolution - left
    return size[1], size[0], top, left, resolution, resolution


# --------------------------------------------------------------------------------------------
# Deterministic order


def stream_samples(seed: int, num_samples: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices and epochs of positions [start, start+count) of the training stream.

    The stream is the concatenation of a fresh permutation of the dataset per epoch, each
    permutation drawn from ``(seed, epoch)``: any position can be computed without the others.
    """
    positions = np.arange(start, start + count)
    epochs = positions // num_samples
    indices = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = _epoch_order(seed, int(epoch), num_samples)
        mask = epochs == epoch
        indices[mask] = order[positions[mask] % num_samples]
    return indices, epochs


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The permutation of one epoch (cached: a run asks for the same epoch once per micro-batch)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    order.flags.writeable = False
    return order


@dataclass(frozen=True)
class Augmentation:
    flip: bool  # the coin for random_flip
    crop: tuple[float, float]  # random-crop position, fractions of the free space
    caption_draw: float  # uniform in [0, 1): the caption is dropped when below caption_dropout


def augmentation(seed: int, epoch: int, index: int) -> Augmentation:
    """The random choices for one sample in one epoch (pure in its arguments)."""
    rng = np.random.default_rng([seed, epoch, index, 1])
    draws = rng.random(4)
    return Augmentation(bool(draws[0] < 0.5), (float(draws[1]), float(draws[2])), float(draws[3]))


# --------------------------------------------------------------------------------------------
# The prepared training set


@dataclass
class TrainingSet:
    """The usable rows of a dataset: captions in memory, images decoded on demand."""

    config: DataConfig
    dataset: Any
    image_column: str
    caption_column: str
    base_dir: Path | None
    indices: list[int]  # dataset rows whose image decodes
    captions: list[str]
    sizes: list[tuple[int, int]]  # (width, height) of each image as stored
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"row": …, "error": …}

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> Image.Image:
        return decode_image(self.dataset[self.indices[i]][self.image_column], self.base_dir)

    def pixels(self, i: int, flip: bool, crop_top_left: tuple[float, float] | None) -> torch.Tensor:
        return transform_image(self.image(i), self.config.resolution, crop_top_left, flip)

    def geometry(self, i: int, flip: bool, crop_top_left: tuple[float, float] | None) -> tuple[int, ...]:
        return crop_geometry(self.sizes[i], self.config.resolution, crop_top_left, flip)


def prepare_training_set(config: DataConfig, progress: bool = True) -> TrainingSet:
    """Load the dataset and check that every image decodes (bad ones: skipped or an error)."""
    from tqdm.auto import tqdm

    dataset, image_column, caption_column, base_dir = load_rows(config)
    captions_column = dataset[caption_column]
    indices, captions, sizes, skipped = [], [], [], []
    held_out = set(held_out_rows(parse_validation(config.validation), len(dataset)))  # never trained on
    for row in tqdm(range(len(dataset)), desc="checking images", disable=not progress, leave=False):
        if row in held_out:
            continue
        value = dataset[row][image_column]
        try:
            size = decode_image(value, base_dir).size
        except Exception as error:
            where = _describe(value, row)
            if config.on_bad_image == "error":
                raise DataError(
                    f"unreadable image {where}: {error}; fix or remove it, or set data.on_bad_image: skip"
                ) from error
            skipped.append({"row": str(row), "image": where, "error": str(error)[:200]})
            continue
        indices.append(row)
        sizes.append(size)
        captions.append(caption_text(captions_column[row]))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s), first: {skipped[0]['image']}", stacklevel=2)
    if not indices:
        raise DataError(f"data.source: none of the {len(dataset)} images of {config.source!r} could be read")
    return TrainingSet(config, dataset, image_column, caption_column, base_dir, indices, captions, sizes, skipped)


def _describe(value: Any, row: int) -> str:
    if isinstance(value, dict) and value.get("path"):
        return f"{value['path']!r} (row {row})"
    if isinstance(value, (str, Path)):
        return f"{str(value)!r} (row {row})"
    return f"at row {row}"
