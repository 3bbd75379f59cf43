"""Dataset layouts besides 🤗 ``datasets`` sources: folders of images with caption files (plain, or
kohya's ``N_name/`` folders with repeat counts), and streamed sets (🤗 hub streaming, webdataset
``.tar`` shards) materialised on disk as they stream.

Each returns rows ``{"image": path, "text": caption, "repeats": n, "mask": path or None}`` that
:func:`sdtune.data.dataset.prepare_training_set` reads like a dataset. A streamed set has no length and no
random access, so the first ``data.max_samples`` samples are written to a cache folder once; the
deterministic order then indexes that folder like any other.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from sdtune.data.images import DataError
from sdtune.errors import first_line
from sdtune.util import atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".caption")  # kohya reads either; both for one image is ambiguous
MASK_SUFFIX = "_mask"  # `cat_mask.png` is the loss mask of `cat.png` (any image suffix)
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet", "metadata.json")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # `10_sks dog`: 10 repeats, caption fallback "sks dog"
WEBDATASET_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "image")
WEBDATASET_CAPTION_KEYS = ("txt", "caption", "text")


def folder_layout(folder: Path) -> str:
    """``imagefolder`` (a 🤗 metadata file), ``kohya`` (``N_name/`` subfolders) or ``captioned`` (images
    with caption files)."""
    if any((folder / name).exists() for name in METADATA_FILES):
        return "imagefolder"
    if any(child.is_dir() and KOHYA_FOLDER.match(child.name) for child in folder.iterdir()):
        return "kohya"
    return "captioned"


def read_captioned_folder(folder: Path, repeats: int = 1) -> list[dict[str, Any]]:
    """Images in ``folder`` with same-named ``.txt``/``.caption`` files; every image needs one."""
    rows = read_images(folder, repeats, fallback=None)
    if not rows:
        raise DataError(f"data.source: {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if not any(row["has_caption"] for row in rows):
        raise DataError(
            f"data.source: no captions found in {str(folder)!r}: put a same-named .txt or .caption file next "
            "to each image, or a metadata.jsonl (🤗 imagefolder)"
        )
    missing = [row["image"] for row in rows if not row["has_caption"]]
    if missing:
        raise DataError(
            f"data.source: {len(missing)} image(s) have no caption file, first {missing[0]!r}; add "
            f"{Path(missing[0]).stem}.txt next to it, or remove the image"
        )
    return rows


def read_kohya_folder(folder: Path) -> list[dict[str, Any]]:
    """kohya's layout: each ``N_name/`` subfolder's images repeat N times an epoch; an image without a
    caption file is captioned with the folder's name (kohya's DreamBooth convention)."""
    rows: list[dict[str, Any]] = []
    for child in sorted(folder.iterdir()):
        match = KOHYA_FOLDER.match(child.name)
        if not child.is_dir():
            continue
        if match is None:
            raise DataError(
                f"data.source: subfolder {child.name!r} of {str(folder)!r} is not named N_name (N = repeats, "
                "e.g. 10_sks dog); rename it or move it out"
            )
        repeats = int(match.group(1))
        if repeats < 1:
            raise DataError(f"data.source: {child.name!r} repeats its images 0 times; name it 1_{match.group(2)} or more")
        found = read_images(child, repeats, fallback=match.group(2))
        if not found:
            raise DataError(f"data.source: {str(child)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        rows += found
    return rows


def read_images(folder: Path, repeats: int, fallback: str | None) -> list[dict[str, Any]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = {p.stem: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(MASK_SUFFIX)}
    masks = {p.stem[: -len(MASK_SUFFIX)]: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.endswith(MASK_SUFFIX)}
    captions: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() not in CAPTION_SUFFIXES:
            continue
        if path.stem not in images:
            raise DataError(
                f"data.source: caption file {str(path)!r} has no image next to it ({path.stem}.png, .jpg, …); "
                "add the image or remove the caption file"
            )
        if path.stem in captions:
            raise DataError(
                f"data.source: {path.stem!r} has two caption files ({captions[path.stem].name}, {path.name}); keep one"
            )
        captions[path.stem] = path
    for stem, mask in masks.items():
        if stem not in images:
            raise DataError(f"data.source: mask {str(mask)!r} has no image {stem}.png next to it; add it or remove the mask")
    rows = []
    for stem, image in images.items():
        caption = captions.get(stem)
        text = _first_line(caption) if caption is not None else (fallback or "")
        rows.append({
            "image": str(image), "text": text, "repeats": repeats, "mask": str(masks[stem]) if stem in masks else None,
            "has_caption": caption is not None,
        })
    return rows


def _first_line(path: Path) -> str:
    """The caption: the file's first non-empty line, stripped (kohya reads the first line)."""
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if line.strip():
            return line.strip()
    return ""


# --------------------------------------------------------------------------------------------
# Streamed sets


def is_webdataset(source: str) -> bool:
    """A local ``.tar`` shard, or a folder of them (and no images)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix == ".tar"
    return path.is_dir() and any(path.glob("*.tar")) and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())


def stream_cache_root() -> Path:
    """Where streamed sets are cached: ``$SDTUNE_CACHE/streams``, default ``~/.cache/sdtune/streams`` —
    one copy for every run, technique, seed and ``compare`` that streams the same samples."""
    return Path(os.environ.get("SDTUNE_CACHE") or Path.home() / ".cache" / "sdtune").expanduser() / "streams"


def materialise_stream(config: Any, cache_root: Path) -> tuple[list[dict[str, Any]], Path]:
    """The first ``config.max_samples`` samples of a streamed source, written once under ``cache_root``
    (images as their original bytes, captions in ``rows.jsonl``); later runs read the folder. The folder's
    name is a hash of the source, split, revision, count and columns."""
    if config.max_samples is None:
        raise DataError(
            "data.streaming: a streamed set has no known length, and the deterministic order needs one; "
            "set data.max_samples (the first N samples are cached on disk as they stream)"
        )
    described = {"source": config.source, "split": config.split, "revision": config.revision, "n": config.max_samples,
                 "image": config.image_column, "caption": config.caption_column, "mask": config.mask_column}
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root / f"stream-{key}"
    if not (folder / "rows.jsonl").exists():
        _write_stream(config, folder)
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines() if line]
    for row in rows:
        row["image"] = str(folder / row["image"])
        row["mask"] = str(folder / row["mask"]) if row.get("mask") else None
    return rows, folder


def _write_stream(config: Any, folder: Path) -> None:
    """Stream into a private folder, then rename it into place (processes may race: the first wins)."""
    dataset = _open_stream(config)
    with atomic.replacing(folder, folder=True, first_wins=True) as temporary:
        lines = _stream_rows(config, dataset, temporary)
        if not lines:
            raise DataError(f"data.source: the stream of {config.source!r} (split {config.split!r}) is empty")
        atomic.write_text(temporary / "rows.jsonl", "\n".join(lines) + "\n")


def _stream_rows(config: Any, dataset: Any, temporary: Path) -> list[str]:
    """Write the first ``max_samples`` samples' files into ``temporary``; their rows as JSON lines."""
    lines = []
    for number, sample in enumerate(dataset):
        if number >= config.max_samples:
            break
        if number == 0:
            image_key = _stream_key(sample, config.image_column, WEBDATASET_IMAGE_KEYS, "image")
            caption_key = _stream_key(sample, config.caption_column, WEBDATASET_CAPTION_KEYS, "caption")
        row = {"image": _write_image(temporary, f"{number:08d}", sample[image_key]), "text": _text(sample[caption_key])}
        if config.mask_column is not None:
            row["mask"] = _write_image(temporary, f"{number:08d}{MASK_SUFFIX}", sample[_stream_key(sample, config.mask_column, (), "mask")])
        lines.append(json.dumps(row))
    return lines


def _open_stream(config: Any) -> Any:
    import datasets

    try:
        if is_webdataset(config.source):
            source = Path(config.source).expanduser()
            files = sorted(str(p) for p in source.glob("*.tar")) if source.is_dir() else [str(source)]
            dataset = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
        else:
            dataset = datasets.load_dataset(config.source, split=config.split, revision=config.revision, streaming=True)
    except Exception as error:  # datasets raises many types; the user needs one line
        raise DataError(
            f"data.source: could not stream {config.source!r} ({first_line(error)}); give a reachable hub dataset id or "
            "webdataset .tar shards"
        ) from error
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():  # keep the original bytes: no decode/re-encode round trip
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def _stream_key(sample: dict[str, Any], wanted: str | None, names: tuple[str, ...], what: str) -> str:
    keys = [k for k in sample if not k.startswith("__")]
    if wanted is not None:
        if wanted not in sample:
            raise DataError(f"data.{what}_column: {wanted!r} is not in the stream's samples; they have: {', '.join(keys)}")
        return wanted
    for name in names:
        if name in sample:
            return name
    raise DataError(f"no {what} field found in the stream's samples; set data.{what}_column to one of: {', '.join(keys)}")


def _write_image(folder: Path, stem: str, value: Any) -> str:
    """Write a streamed image as it came (bytes) or as PNG (a decoded image); return the file name."""
    from PIL import Image

    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, dict) and value.get("path"):  # a file the stream points to (local, or fsspec)
        import fsspec

        with fsspec.open(value["path"], "rb") as file:
            data = file.read()
    elif isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise DataError(f"cannot read an image from a streamed value of type {type(value).__name__}")
    suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg" if data[:2] == b"\xff\xd8" else ".img"
    atomic.write_bytes(folder / f"{stem}{suffix}", data)  # (inside the stream's private folder)
    return f"{stem}{suffix}"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value).strip()
