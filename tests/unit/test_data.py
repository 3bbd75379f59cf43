"""Datasets: deterministic order, transforms, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdtune.config import DataConfig
from sdtune.data.dataset import DataError, augmentation, prepare_training_set, stream_samples, transform_image


def test_stream_is_a_permutation_per_epoch_and_pure():
    indices, epochs = stream_samples(seed=3, num_samples=5, start=0, count=15)
    for epoch in range(3):
        assert sorted(indices[epochs == epoch]) == list(range(5))
    again, _ = stream_samples(seed=3, num_samples=5, start=7, count=4)
    assert list(again) == list(indices[7:11])  # any window is computable alone (resume)
    other, _ = stream_samples(seed=4, num_samples=5, start=0, count=15)
    assert list(other) != list(indices)
    assert augmentation(0, 1, 2) == augmentation(0, 1, 2)


def test_transform_crop_flip_and_range():
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    centre = transform_image(image, 8, None, flip=False)
    assert centre.shape == (3, 8, 8) and centre.min() >= -1 and centre.max() <= 1
    left = transform_image(image, 8, (0.0, 0.0), flip=False)
    assert left.mean() > 0.9  # the crop at the far left is all white
    flipped = transform_image(image, 8, (0.0, 0.0), flip=True)
    assert np.allclose(flipped.numpy(), left.numpy()[:, :, ::-1])


def _folder(tmp_path, rows, images=2):
    for i in range(images):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_missing_caption_column_lists_columns(tmp_path):
    folder = _folder(tmp_path, [{"file_name": "0.png", "words": "x"}, {"file_name": "1.png", "words": "y"}])
    with pytest.raises(DataError, match="no caption column found; set data.caption_column to one of: image, words"):
        prepare_training_set(DataConfig(source=str(folder), resolution=8), progress=False)
    with pytest.raises(DataError, match="'text' is not a column; the dataset has: image, words"):
        prepare_training_set(DataConfig(source=str(folder), resolution=8, caption_column="text"), progress=False)


def test_unreadable_image_is_skipped_or_an_error(tmp_path):
    folder = _folder(tmp_path, [{"file_name": f"{i}.png", "text": "t"} for i in range(3)], images=3)
    (folder / "1.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        data = prepare_training_set(DataConfig(source=str(folder), resolution=8), progress=False)
    assert len(data) == 2 and len(data.skipped) == 1
    with pytest.raises(DataError, match="unreadable image .*set data.on_bad_image: skip"):
        prepare_training_set(DataConfig(source=str(folder), resolution=8, on_bad_image="error"), progress=False)


def test_csv_with_relative_paths(tmp_path):
    for i in range(2):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
    (tmp_path / "data.csv").write_text("path,caption\n0.png,zero\n1.png,one\n")
    data = prepare_training_set(DataConfig(source=str(tmp_path / "data.csv"), resolution=8), progress=False)
    assert data.captions == ["zero", "one"] and data.pixels(1, False, None).shape == (3, 8, 8)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "data.csv").write_text("path,caption\n")
    with pytest.raises(DataError, match="no rows|could not load"):
        prepare_training_set(DataConfig(source=str(tmp_path / "data.csv"), resolution=8), progress=False)
