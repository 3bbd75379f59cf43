"""Dataset layouts (captioned folders, kohya folders, streamed sets), caption options, image modes,
and the one-line errors for the layout mistakes people make (issue #14)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from sdtune.config import ConfigError, DataConfig
from sdtune.data.dataset import DataError, prepare_training_set, shuffled_caption
from sdtune.data.images import to_rgb
from sdtune.experiment import experiment_from_dict


def _image(path, size=(16, 12), colour=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return path


def _config(source, **keys) -> DataConfig:
    config = DataConfig(source=str(source), resolution=8, **keys)
    config.validate()
    return config


def test_captioned_folder_reads_txt_and_caption_files_with_repeats_prefix_suffix(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\nsecond line ignored\n")
    _image(tmp_path / "b.jpg", colour=(0, 0, 200))
    (tmp_path / "b.caption").write_text("a blue square")
    data = prepare_training_set(
        _config(tmp_path, repeats=3, caption_prefix="sks, ", caption_suffix=", art"), progress=False
    )
    assert data.captions == ["sks, a red square, art", "sks, a blue square, art"]
    assert data.num_slots == 6 and data.slot_images() == (0, 0, 0, 1, 1, 1)
    assert data.pixels(1, False, None).shape == (3, 8, 8) and data.pixels(1, False, None)[2].mean() > 0


def test_kohya_folders_repeat_and_fall_back_to_the_folder_name(tmp_path):
    (tmp_path / "3_sks dog").mkdir()
    (tmp_path / "1_style").mkdir()
    _image(tmp_path / "3_sks dog" / "x.png")
    _image(tmp_path / "1_style" / "y.png")
    _image(tmp_path / "1_style" / "z.png")
    (tmp_path / "1_style" / "z.txt").write_text("a painting")
    data = prepare_training_set(_config(tmp_path), progress=False)
    assert data.captions == ["style", "a painting", "sks dog"]  # folders in name order, then files
    assert data.repeats == [1, 1, 3] and data.num_slots == 5 and data.slot_images() == (0, 1, 2, 2, 2)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: _image(d / "a.png"), "no captions found in .* put a same-named .txt or .caption file"),
        (lambda d: [_image(d / "a.png"), (d / "a.txt").write_text("x"), (d / "b.txt").write_text("y")],
         "caption file .*b.txt' has no image next to it"),
        (lambda d: [_image(d / "a.png"), (d / "a.txt").write_text("x"), (d / "a.caption").write_text("y")],
         "'a' has two caption files"),
        (lambda d: [_image(d / "a.png"), _image(d / "b.png"), (d / "a.txt").write_text("x")],
         "1 image\\(s\\) have no caption file, first .*b.png"),
        (lambda d: [(d / "x_sks").mkdir(), (d / "2_ok").mkdir(), _image(d / "2_ok" / "a.png")], "subfolder 'x_sks' .* is not named N_name"),
        (lambda d: [(d / "0_dog").mkdir(), _image(d / "0_dog" / "a.png")], "'0_dog' repeats its images 0 times"),
    ],
    ids=["no-captions", "caption-without-image", "two-captions", "image-without-caption", "kohya-name", "kohya-zero"],
)
def test_layout_mistakes_are_one_line_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message) as error:
        prepare_training_set(_config(tmp_path), progress=False)
    assert "\n" not in str(error.value)


def test_image_modes_are_converted_or_refused_with_a_reason(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red → white, not red or black
    assert np.asarray(to_rgb(rgba)).tolist() == np.full((4, 4, 3), 255).tolist()
    deep = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # 16-bit mid grey → 128, not clipped to 255
    assert deep.mode == "I;16" and np.asarray(to_rgb(deep))[0, 0].tolist() == [128, 128, 128]
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [10, 20, 30]
    with pytest.raises(DataError, match="CMYK image: .*save it as RGB"):
        to_rgb(Image.new("CMYK", (4, 4)))
    # in a folder: the CMYK image and a 0-byte file are skipped with their reasons, or stop the run
    for name, caption in (("good", "ok"), ("cmyk", "c"), ("empty", "e")):
        (tmp_path / f"{name}.txt").write_text(caption)
    _image(tmp_path / "good.png")
    _image(tmp_path / "cmyk.jpg", mode="CMYK", colour=(0, 0, 0, 0))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2 unreadable image"):
        data = prepare_training_set(_config(tmp_path), progress=False)
    reasons = {s["image"].split("/")[-1].split("'")[0]: s["error"] for s in data.skipped}
    assert data.captions == ["ok"] and "CMYK" in reasons["cmyk.jpg"] and "0 bytes" in reasons["empty.png"]
    _image(tmp_path / "clear.png", mode="RGBA", colour=(0, 0, 0, 0))
    (tmp_path / "clear.txt").write_text("transparent")
    with pytest.warns(UserWarning):
        data = prepare_training_set(_config(tmp_path), progress=False)
    assert data.converted == {"RGBA": 1} and data.pixels(data.captions.index("transparent"), False, None).min() == 1.0
    with pytest.raises(DataError, match="unreadable image .*(CMYK|0 bytes).*set data.on_bad_image: skip"):
        prepare_training_set(_config(tmp_path, on_bad_image="error"), progress=False)


def test_caption_shuffle_keeps_the_first_tags_and_is_deterministic():
    caption = "sks, dog, red, running, grass, sunny"
    first = shuffled_caption(caption, 2, seed=0, epoch=0, slot=5)
    assert first.split(", ")[:2] == ["sks", "dog"] and sorted(first.split(", ")) == sorted(caption.split(", "))
    assert first == shuffled_caption(caption, 2, seed=0, epoch=0, slot=5)
    others = {shuffled_caption(caption, 2, seed=0, epoch=e, slot=5) for e in range(8)}
    assert len(others) > 1 and all(o.startswith("sks, dog, ") for o in others)


def _shard(path, count):
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            buffer, mask = io.BytesIO(), io.BytesIO()
            Image.new("RGB", (16, 12), (i * 60, 0, 0)).save(buffer, format="PNG")
            Image.new("L", (16, 12), 255 * (i % 2)).save(mask, format="PNG")
            files = ((f"{i:03d}.png", buffer.getvalue()), (f"{i:03d}.txt", f"caption {i}".encode()),
                     (f"{i:03d}.mask.png", mask.getvalue()))
            for name, payload in files:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def test_webdataset_shards_stream_into_a_disk_cache(tmp_path):
    shard = _shard(tmp_path / "shard-000.tar", 4)
    with pytest.raises(DataError, match="set data.max_samples"):
        prepare_training_set(_config(shard), progress=False, cache_root=tmp_path / "cache")
    data = prepare_training_set(_config(shard, max_samples=3), progress=False, cache_root=tmp_path / "cache")
    assert data.captions == ["caption 0", "caption 1", "caption 2"] and data.sizes == [(16, 12)] * 3
    cached = list((tmp_path / "cache").glob("stream-*/*.png"))
    assert len(cached) == 3
    shard.write_bytes(b"")  # the second run reads the cache, not the stream
    again = prepare_training_set(_config(shard, max_samples=3, streaming=True), progress=False, cache_root=tmp_path / "cache")
    assert again.captions == data.captions and np.array_equal(again.pixels(2, False, None), data.pixels(2, False, None))
    masked = prepare_training_set(_config(_shard(tmp_path / "m.tar", 2), max_samples=2, mask_column="mask.png"),
                                  progress=False, cache_root=tmp_path / "cache")
    assert masked.mask(0, False, None).max() == 0 and masked.mask(1, False, None).min() == 1


def test_hub_style_streaming_reads_the_first_rows(tiny_data, tmp_path):
    data = prepare_training_set(_config(tiny_data, streaming=True, max_samples=3), progress=False, cache_root=tmp_path)
    plain = prepare_training_set(_config(tiny_data, max_samples=3), progress=False)
    assert data.captions == plain.captions
    assert np.array_equal(data.pixels(1, True, None), plain.pixels(1, True, None))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"keep_tokens": 1}, "data.keep_tokens: applies with data.shuffle_captions: true"),
        ({"streaming": True}, "data.streaming: .*set data.max_samples"),
        ({"buckets": [[32, 30]]}, "data.buckets: \\[32, 30\\] is not allowed; expected a \\[width, height\\] pair of positive multiples of 8"),
        ({"buckets": [[64, 64]]}, "data.buckets: \\[64, 64\\] is not allowed; expected a bucket of at most data.resolution²"),
        ({"buckets": "square"}, "data.buckets: 'square' is not allowed"),
        ({"repeats": 0}, "data.repeats: 0 is not allowed"),
    ],
)
def test_bad_data_keys_fail_at_load(tiny_model, tiny_data, data, message):
    raw = {"model": str(tiny_model), "data": {"source": str(tiny_data), "resolution": 32, **data},
           "train": {"max_train_steps": 1}, "techniques": {"lora": {"kind": "lora"}}}
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(raw)
