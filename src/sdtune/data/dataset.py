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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtune.config import DataConfig, ValidationSplit, held_out_rows
from sdtune.data import layouts
from sdtune.data.buckets import BucketOrder, assign_buckets, bucket_sizes, bucket_summary, check_buckets
from sdtune.data.images import DataError, to_mask, to_rgb
from sdtune.errors import first_line

log = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "images", "file_name", "filename", "image_path", "path", "file")
CAPTION_COLUMN_NAMES = ("text", "caption", "captions", "prompt", "description", "label")
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


__all__ = ["DataError", "TrainingSet", "prepare_training_set"]


# --------------------------------------------------------------------------------------------
# Loading


def load_rows(config: DataConfig, cache_root: Path | None = None) -> tuple[Any, str, str | None, Path | None]:
    """Load the dataset; return (dataset with undecoded images, image column, caption column, base dir).

    Folders of captioned images, kohya folders and streamed sets give a list of row dicts
    (:mod:`sdtune.data.layouts`) with columns ``image``, ``text``, ``repeats`` and ``mask``."""
    import datasets

    source = Path(config.source).expanduser()
    base_dir: Path | None = None
    if config.streaming or layouts.is_webdataset(config.source):
        rows, folder = layouts.materialise_stream(config, cache_root or layouts.stream_cache_root())
        return rows, "image", "text", folder
    if source.is_dir() and layouts.folder_layout(source) != "imagefolder":
        if config.mask_column is not None:
            raise DataError(
                f"data.mask_column: {str(source)!r} is a folder of image files, which has no columns; put each "
                "mask next to its image as NAME_mask.png and remove data.mask_column"
            )
        reader = layouts.read_kohya_folder if layouts.folder_layout(source) == "kohya" else layouts.read_captioned_folder
        if config.instance_prompt is not None and reader is layouts.read_captioned_folder:
            reader = lambda folder: layouts.read_images(folder, 1, fallback=config.instance_prompt)  # noqa: E731  (DreamBooth: no captions)
        rows = reader(source)[: config.max_samples]
        if not rows:
            raise DataError(f"data.source: {config.source!r} holds no images ({', '.join(layouts.IMAGE_SUFFIXES)})")
        return rows, "image", "text", source
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
        raise DataError(
            f"data.source: could not load {config.source!r} ({first_line(error)}); give a local imagefolder "
            "with metadata.jsonl/csv, a .parquet/.jsonl/.csv file, or a reachable hub dataset id"
        ) from error
    if config.max_samples is not None:
        dataset = dataset.select(range(min(config.max_samples, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"data.source: {config.source!r} has no rows (split {config.split!r})")
    image_column = _pick_column(dataset, config.image_column, IMAGE_COLUMN_NAMES, "image", image=True)
    caption_column = None  # DreamBooth's instance prompt captions every image
    if config.instance_prompt is None:
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


def caption_values(config: DataConfig, dataset: Any, caption_column: str | None) -> list[Any]:
    """Every row's caption as stored (:func:`caption_text` reads one); DreamBooth's instance prompt
    captions every image."""
    if config.instance_prompt is not None:
        return [config.instance_prompt] * len(dataset)
    if isinstance(dataset, list):
        return [row[caption_column] for row in dataset]
    return list(dataset[caption_column])


def decode_image(value: Any, base_dir: Path | None, converted: dict[str, int] | None = None) -> Image.Image:
    """An RGB PIL image from a datasets Image value, a path, bytes, or a PIL image (other modes
    converted by :func:`sdtune.data.images.to_rgb`, counted per mode in ``converted``, or refused)."""
    if isinstance(value, (str, Path)) or (isinstance(value, dict) and not value.get("bytes") and value.get("path")):
        path = _resolve(str(value if isinstance(value, (str, Path)) else value["path"]), base_dir)
        if path.exists() and path.stat().st_size == 0:
            raise DataError("the file is empty (0 bytes)")
    image = _open_image(value, base_dir)
    image.load()
    if image.width == 0 or image.height == 0:
        raise DataError(f"the image is {image.width}×{image.height} pixels")
    rgb = to_rgb(image)
    if converted is not None and image.mode != "RGB":
        converted[image.mode] = converted.get(image.mode, 0) + 1
    return rgb


def _open_image(value: Any, base_dir: Path | None) -> Image.Image:
    """A PIL image (not yet decoded) from a datasets Image value, a path, bytes, or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(_resolve(value["path"], base_dir))
    if isinstance(value, (str, Path)):
        return Image.open(_resolve(str(value), base_dir))
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    raise DataError(f"cannot read an image from a value of type {type(value).__name__}")


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
    image: Image.Image, size: int | tuple[int, int], crop_top_left: tuple[float, float] | None, flip: bool
) -> torch.Tensor:
    """Resize to cover ``size`` (a square side, or (width, height)), crop it, flip, scale to [-1, 1].

    ``crop_top_left`` is the crop's position as fractions of the free space (None = centre).
    Returns a float32 tensor of shape (3, height, width).
    """
    image = fit_image(image, size, crop_top_left, flip, Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def fit_image(
    image: Image.Image, size: int | tuple[int, int], crop_top_left: tuple[float, float] | None, flip: bool, resample: int
) -> Image.Image:
    """The resize-to-cover, crop and flip of :func:`transform_image` (masks get the same, as images)."""
    width, height = _pair(size)
    new_size = resized_size(image.size, size)
    if new_size != image.size:
        image = image.resize(new_size, resample)
    top, left = crop_origin(new_size, size, crop_top_left)
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resized_size(size: tuple[int, int], target: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) after scaling by the smallest factor that covers ``target`` (a square side or
    (width, height)): the least content is cropped."""
    width, height = size
    target_width, target_height = _pair(target)
    scale = max(target_width / width, target_height / height)
    return max(target_width, round(width * scale)), max(target_height, round(height * scale))


def crop_origin(
    resized: tuple[int, int], target: int | tuple[int, int], crop_top_left: tuple[float, float] | None
) -> tuple[int, int]:
    """(top, left) pixel of the crop in the resized image (fractions of the free space; None = centre)."""
    target_width, target_height = _pair(target)
    free_x, free_y = resized[0] - target_width, resized[1] - target_height
    fx, fy = crop_top_left if crop_top_left is not None else (0.5, 0.5)
    return int(round(free_y * fy)), int(round(free_x * fx))


def crop_geometry(
    size: tuple[int, int], target: int | tuple[int, int], crop_top_left: tuple[float, float] | None, flip: bool
) -> tuple[int, int, int, int, int, int]:
    """(original height, original width, crop top, crop left, target height, target width) of a
    training sample: SDXL's micro-conditioning (Podell et al. 2023, §2.2–2.3: the bucket is the target
    size). A flip mirrors the crop's left edge, so the numbers describe the image the model sees."""
    target_width, target_height = _pair(target)
    resized = resized_size(size, target)
    top, left = crop_origin(resized, target, crop_top_left)
    if flip:
        left = resized[0] - target_width - left
    return size[1], size[0], top, left, target_height, target_width


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


def shuffled_caption(caption: str, keep_tokens: int, seed: int, epoch: int, slot: int) -> str:
    """Comma-separated tags in a fresh order per (seed, epoch, slot), the first ``keep_tokens`` kept in
    front (kohya's ``shuffle_caption``/``keep_tokens``: a trigger word or a subject stays first)."""
    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = np.random.default_rng([seed, epoch, slot, 4]).permutation(len(rest))
    return ", ".join(kept + [rest[i] for i in order])


# --------------------------------------------------------------------------------------------
# The prepared training set


@dataclass
class TrainingSet:
    """The usable rows of a dataset: captions in memory, images decoded on demand.

    An image is one index; with repeats (kohya folders, ``data.repeats``) it fills several *slots* of
    an epoch, each with its own flips, crops and caption shuffles, sharing one cache entry."""

    config: DataConfig
    dataset: Any
    image_column: str
    caption_column: str | None  # None: data.instance_prompt is every caption
    base_dir: Path | None
    indices: list[int]  # dataset rows whose image decodes
    captions: list[str]  # with data.caption_prefix/suffix
    sizes: list[tuple[int, int]]  # (width, height) of each image as stored
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"row": …, "error": …}
    raw_captions: list[str] = field(default_factory=list)  # as read (what shuffle_captions reorders)
    repeats: list[int] = field(default_factory=list)  # slots per image an epoch (empty: 1 each)
    masks: list[Any] = field(default_factory=list)  # per image: a mask value (path, bytes…) or None
    buckets: list[tuple[int, int]] = field(default_factory=list)  # candidate (width, height); empty: square
    bucket_of: list[int] = field(default_factory=list)  # per image: its bucket
    converted: dict[str, int] = field(default_factory=dict)  # PIL mode → images converted to RGB from it
    caption_transform: Callable[[str], str] | None = None  # the technique's (see :meth:`transform_captions`)

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> Image.Image:
        return decode_image(self.dataset[self.indices[i]][self.image_column], self.base_dir)

    def target_size(self, i: int) -> int | tuple[int, int]:
        """The training size of image ``i``: its bucket (width, height), or the square resolution."""
        return self.buckets[self.bucket_of[i]] if self.buckets else self.config.resolution

    def pixels(self, i: int, flip: bool, crop_top_left: tuple[float, float] | None) -> torch.Tensor:
        return transform_image(self.image(i), self.target_size(i), crop_top_left, flip)

    def geometry(self, i: int, flip: bool, crop_top_left: tuple[float, float] | None) -> tuple[int, ...]:
        return crop_geometry(self.sizes[i], self.target_size(i), crop_top_left, flip)

    def mask(self, i: int, flip: bool, crop_top_left: tuple[float, float] | None) -> torch.Tensor | None:
        """Image ``i``'s loss mask, (1, height, width) in [0, 1] with the image's own crop and flip; None
        without one (the whole image counts)."""
        if not self.masks or self.masks[i] is None:
            return None
        mask = Image.fromarray(read_mask(self.masks[i], self.base_dir))
        mask = fit_image(mask, self.target_size(i), crop_top_left, flip, Image.BILINEAR)
        return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]

    def caption(self, i: int, seed: int, epoch: int, slot: int) -> str:
        """The caption the model sees for image ``i`` in this slot and epoch (shuffled if asked, then
        the technique's transform)."""
        config = self.config
        if not config.shuffle_captions:
            return self.captions[i]
        raw = self.raw_captions[i]
        caption = config.caption_prefix + shuffled_caption(raw, config.keep_tokens, seed, epoch, slot) + config.caption_suffix
        return self.caption_transform(caption) if self.caption_transform is not None else caption

    def transform_captions(self, transform: Callable[[str], str]) -> None:
        """Apply a technique's caption transform (:meth:`sdtune.techniques.Technique.transform_caption`)
        to every caption the model sees: the fixed ones now, each shuffled one as it is built."""
        if self.caption_transform is not None:
            raise ValueError("a training set takes one caption transform")
        self.caption_transform = transform
        self.captions = [transform(caption) for caption in self.captions]

    # -- repeats and buckets: what the data order needs ---------------------------------------
    @property
    def num_slots(self) -> int:
        return sum(self.repeats) if self.repeats else len(self)

    def slot_images(self) -> tuple[int, ...] | None:
        """Slot → image index, or None when every image has one slot (slot = image)."""
        if not self.repeats or all(r == 1 for r in self.repeats):
            return None
        return tuple(i for i, repeat in enumerate(self.repeats) for _ in range(repeat))

    def bucket_order(self, seed: int, step_size: int) -> BucketOrder | None:
        if not self.buckets:
            return None
        slots = self.slot_images() or tuple(range(len(self)))
        members: list[list[int]] = [[] for _ in self.buckets]
        for slot, image in enumerate(slots):
            members[self.bucket_of[image]].append(slot)
        return BucketOrder(seed=seed, members=members, step_size=step_size)

    def bucket_summary(self) -> list[dict[str, int]] | None:
        if not self.buckets:
            return None
        return bucket_summary(self.buckets, self.bucket_of, self.repeats or [1] * len(self))


def read_mask(value: Any, base_dir: Path | None) -> np.ndarray:
    """A mask value (path, bytes, datasets Image value, PIL image) as uint8 (height, width), 0–255."""
    image = _open_image(value, base_dir)
    return np.round(to_mask(image) * 255).astype(np.uint8)


def prepare_training_set(
    config: DataConfig, progress: bool = True, stride: int = 8, cache_root: Path | None = None,
    held_out: ValidationSplit | None = None,
) -> TrainingSet:
    """Load the dataset and check that every image decodes (bad ones: skipped or an error); read
    repeats, masks and captions; put each image in its bucket (``stride``: the model's pixel multiple,
    :attr:`sdtune.models.Model.pixel_stride`). ``held_out``: the parsed ``data.validation``
    (:attr:`sdtune.experiment.Experiment.validation`), whose rows never train. Streamed sets are cached
    under ``cache_root`` (default: :func:`sdtune.data.layouts.stream_cache_root`)."""
    from tqdm.auto import tqdm

    if config.validation is not None and held_out is None:  # (a caller's slip would train on held-out rows)
        raise ValueError("prepare_training_set: data.validation is set; pass its parsed split as held_out")

    dataset, image_column, caption_column, base_dir = load_rows(config, cache_root)
    captions_column = caption_values(config, dataset, caption_column)
    if config.mask_column is not None and not isinstance(dataset, list) and config.mask_column not in dataset.column_names:
        raise DataError(
            f"data.mask_column: {config.mask_column!r} is not a column; the dataset has: {', '.join(dataset.column_names)}"
        )
    indices, captions, sizes, skipped, repeats, masks, converted = [], [], [], [], [], [], {}
    held_out_set = set(held_out_rows(held_out, len(dataset)))  # never trained on
    for row in tqdm(range(len(dataset)), desc="checking images", disable=not progress, leave=False):
        if row in held_out_set:
            continue
        value = dataset[row][image_column]
        try:
            size = decode_image(value, base_dir, converted).size
            mask = dataset[row].get("mask") if isinstance(dataset, list) else _mask_of(config, dataset[row], value, base_dir)
            if mask is not None:
                _check_mask(mask, size, base_dir)
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
        repeats.append(config.repeats * (dataset[row].get("repeats", 1) if isinstance(dataset, list) else 1))
        masks.append(mask)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s), first: {skipped[0]['image']}: {skipped[0]['error']}", stacklevel=2)
    if converted:
        log.info("converted to RGB: %s", ", ".join(f"{n} {mode}" for mode, n in sorted(converted.items())))
    if not indices:
        raise DataError(f"data.source: none of the {len(dataset)} images of {config.source!r} could be read")
    buckets: list[tuple[int, int]] = []
    bucket_of: list[int] = []
    if config.buckets is not None:
        if config.buckets == "auto":
            buckets = bucket_sizes(config.resolution, stride, config.bucket_max_aspect)
        else:
            buckets = [(int(w), int(h)) for w, h in config.buckets]
            check_buckets(buckets, config.resolution, stride)
        bucket_of = assign_buckets(sizes, buckets)
    final = [config.caption_prefix + c + config.caption_suffix for c in captions]
    return TrainingSet(
        config, dataset, image_column, caption_column, base_dir, indices, final, sizes, skipped,
        raw_captions=captions, repeats=repeats, masks=masks if any(m is not None for m in masks) else [],
        buckets=buckets, bucket_of=bucket_of, converted=converted,
    )


def _mask_of(config: DataConfig, row: dict[str, Any], image: Any, base_dir: Path | None) -> Any:
    """A 🤗 dataset row's mask value: ``data.mask_column``, or a ``*_mask.png`` next to the image file
    (an imagefolder lists only its metadata's files, so the mask is not read as an image)."""
    if config.mask_column is not None:
        return row[config.mask_column]
    path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
    if not path:
        return None
    image_path = _resolve(path, base_dir)
    candidate = image_path.with_name(image_path.stem + layouts.MASK_SUFFIX + image_path.suffix)
    return str(candidate) if candidate.exists() else None


def _check_mask(value: Any, size: tuple[int, int], base_dir: Path | None) -> None:
    mask = read_mask(value, base_dir)
    if (mask.shape[1], mask.shape[0]) != size:
        raise DataError(
            f"its mask is {mask.shape[1]}×{mask.shape[0]} pixels but the image is {size[0]}×{size[1]}; "
            "make the mask the image's size"
        )


def _describe(value: Any, row: int) -> str:
    if isinstance(value, dict) and value.get("path"):
        return f"{value['path']!r} (row {row})"
    if isinstance(value, (str, Path)):
        return f"{str(value)!r} (row {row})"
    return f"at row {row}"
