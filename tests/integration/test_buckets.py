"""Aspect-ratio buckets and loss masks (issue #14): assignment, the one-bucket-a-step order, a
bucketed run that resumes bit for bit, and a masked loss that ignores masked-out latents."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from sdtune.config import DataConfig
from sdtune.data.batches import Layout, latent_masks
from sdtune.data.buckets import BucketOrder, assign_buckets, bucket_sizes
from sdtune.data.dataset import DataError, prepare_training_set
from sdtune.diffusion import diffusion_loss
from sdtune.experiment import load_experiment
from sdtune.generation import load_run_pipeline
from sdtune.models.sampling import generate_images
from sdtune.training import train_technique


def test_bucket_sizes_are_area_bounded_multiples_and_assignment_is_closest_aspect():
    buckets = bucket_sizes(64, 8, 2.0)
    assert buckets == bucket_sizes(64, 8, 2.0) and (64, 64) in buckets
    for width, height in buckets:
        assert width % 8 == 0 and height % 8 == 0 and width * height <= 64 * 64
        assert max(width / height, height / width) <= 2.0
    assert (128, 32) not in buckets and (32, 128) not in buckets  # 4:1 is beyond the bound
    assigned = assign_buckets([(300, 100), (100, 300), (500, 490), (160, 100)], buckets)
    picked = [buckets[i] for i in assigned]
    assert picked[0][0] > picked[0][1] and picked[1][0] < picked[1][1] and picked[2] == (64, 64)
    assert abs(np.log(picked[3][0] / picked[3][1]) - np.log(1.6)) == min(abs(np.log(w / h) - np.log(1.6)) for w, h in buckets)


def test_every_step_holds_one_bucket_on_every_micro_step_and_process():
    members = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # slots per bucket
    bucket_of = {slot: b for b, slots in enumerate(members) for slot in slots}
    total = 4  # batch 1 × accumulation 2 × 2 processes
    order = BucketOrder(seed=3, members=members, step_size=total)
    assert order.steps_per_epoch == 2 + 1 + 1
    layouts = [
        Layout(seed=3, num_samples=10, batch_size=1, accumulation=2, num_processes=2, process_index=p,
               random_flip=True, center_crop=True, caption_dropout=0.0, order=BucketOrder(3, members, total))
        for p in range(2)
    ]
    for step in range(3 * order.steps_per_epoch):  # three epochs
        slots = [s for micro in range(2) for layout in layouts for s in layout.plan(step * 2 + micro).slots]
        assert len({bucket_of[s] for s in slots}) == 1, (step, slots)
    for epoch in range(3):  # each epoch uses every slot (a short bucket's last step wraps around)
        assert set(order.epoch_table(epoch).ravel()) == set(range(10))
    window, _ = BucketOrder(3, members, total).slots(9, 5)  # any window computed alone (resume)
    assert window.tolist() == order.slots(0, 20)[0][9:14].tolist()
    assert order.epoch_table(0).tolist() != order.epoch_table(1).tolist()
    assert layouts[0].steps_for_epochs(2) == 8  # num_epochs counts whole one-bucket steps


def test_repeats_fill_an_epoch_with_each_image_n_times():
    layout = Layout(seed=0, num_samples=5, batch_size=5, accumulation=1, num_processes=1, process_index=0,
                    random_flip=True, center_crop=False, caption_dropout=0.0, slot_images=(0, 0, 0, 1, 1))
    batch = layout.plan(0)  # one micro-batch = one epoch
    assert sorted(batch.indices) == [0, 0, 0, 1, 1] and sorted(batch.slots) == [0, 1, 2, 3, 4]
    crops = [crop for index, crop in zip(batch.indices, batch.crops) if index == 0]
    assert len(set(crops)) == 3  # each repeat draws its own crop (and flip)
    assert layout.steps_for_epochs(3) == 3


def _bucketed_folder(folder):
    """A kohya folder: wide images (one with a mask) repeated twice, tall ones once."""
    rng = np.random.default_rng(0)
    (folder / "2_wide").mkdir(parents=True)
    (folder / "1_tall").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 48, 3), dtype=np.uint8)).save(folder / "2_wide" / f"w{i}.png")
        (folder / "2_wide" / f"w{i}.txt").write_text("a red square, small, yoda")
        Image.fromarray(rng.integers(0, 255, (50, 26, 3), dtype=np.uint8)).save(folder / "1_tall" / f"t{i}.png")
    mask = np.zeros((24, 48), dtype=np.uint8)
    mask[:, :24] = 255  # the left half trains
    Image.fromarray(mask).save(folder / "2_wide" / "w0_mask.png")
    return folder


def _interrupt_at(step):
    def hook(done):
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_a_bucketed_run_trains_resumes_bit_exact_and_records_buckets(tiny_model, tmp_path):
    data = _bucketed_folder(tmp_path / "data")
    raw = {
        "name": "buckets", "model": str(tiny_model),
        "data": {"source": str(data), "resolution": 32, "buckets": "auto", "center_crop": True, "random_flip": True,
                 "shuffle_captions": True, "keep_tokens": 1, "caption_prefix": "yoda, "},
        "train": {"batch_size": 2, "gradient_accumulation_steps": 1, "max_train_steps": 4, "learning_rate": 1e-3,
                  "checkpointing_steps": None},
        "techniques": {"lora": {"kind": "lora", "rank": 2}},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    first = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'a'}"]), "lora", progress=False)
    stopped = load_experiment(path, [f"output_dir={tmp_path / 'b'}"])
    train_technique(stopped, "lora", progress=False, after_step=_interrupt_at(2))
    resumed = train_technique(stopped, "lora", progress=False, resume=True)
    a, b = load_file(first.run_dir / "unet_adapter.safetensors"), load_file(resumed.run_dir / "unet_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in first.record["loss_history"]] == [h["loss"] for h in resumed.record["loss_history"]]
    recorded = first.record["data"]
    by_shape = {(b["width"], b["height"]): (b["images"], b["samples"]) for b in recorded["buckets"]}
    wide = [s for s in by_shape if s[0] > s[1]]
    tall = [s for s in by_shape if s[0] < s[1]]
    assert len(wide) == 1 and len(tall) == 1 and by_shape[wide[0]] == (3, 6) and by_shape[tall[0]] == (3, 3)
    assert all(w * h <= 32 * 32 and w % 4 == 0 and h % 4 == 0 for w, h in by_shape)  # tiny SD1: stride 2 × 2
    assert recorded["samples_per_epoch"] == 9 and recorded["masked_images"] == 1
    pipe, _ = load_run_pipeline(first.run_dir)  # sampling at a bucket's size
    images = generate_images(pipe, ["yoda"], [0], num_inference_steps=2, guidance_scale=3.0, resolution=wide[0], progress=False)
    assert images.images[0].size == wide[0]


def test_masked_loss_gives_masked_out_latents_no_gradient():
    prediction = torch.randn(2, 4, 4, 6, requires_grad=True)
    target = torch.randn(2, 4, 4, 6)
    mask = torch.zeros(2, 1, 4, 6)
    mask[..., :3] = 1  # left half in
    diffusion_loss(prediction, target, mask=mask).backward()
    assert torch.all(prediction.grad[..., 3:] == 0) and torch.all(prediction.grad[..., :3] != 0)
    left_only = diffusion_loss(prediction[..., :3], target[..., :3])
    assert torch.allclose(diffusion_loss(prediction, target, mask=mask), left_only)  # mean over masked-in pixels
    assert torch.equal(diffusion_loss(prediction, target, mask=torch.ones(2, 1, 4, 6)), diffusion_loss(prediction, target))


def test_masks_follow_the_image_crop_and_flip_down_to_the_latent_grid(tmp_path):
    data = _bucketed_folder(tmp_path)
    training_set = prepare_training_set(DataConfig(source=str(data), resolution=32, buckets="auto"), progress=False, stride=4)
    wide = training_set.captions.index("a red square, small, yoda")  # w0: the masked one
    width, height = training_set.target_size(wide)
    mask = training_set.mask(wide, False, None)[0]
    assert mask.shape == (height, width) and mask[:, : width // 2 - 1].min() == 1 and mask[:, width // 2 + 1 :].max() == 0
    flipped = training_set.mask(wide, True, None)[0]
    assert torch.equal(flipped, mask.flip(-1))
    pixels = training_set.pixels(wide, True, None)
    assert pixels.shape[1:] == flipped.shape
    # SDXL's micro-conditioning: the real original size, the crop in the resized image, the bucket
    resized_width = round(48 * height / 24)  # 48×24 scaled to cover the bucket's height
    assert training_set.geometry(wide, False, None) == (24, 48, 0, (resized_width - width) // 2, height, width)

    class Batch:
        indices, flips, crops = [wide, wide], [False, True], [None, None]

    latents = torch.zeros(2, 4, height // 2, width // 2)
    masks = latent_masks(training_set, Batch, latents)
    assert masks.shape == (2, 1, height // 2, width // 2)
    assert masks[0, 0, :, 0].min() == 1 and masks[0, 0, :, -1].max() == 0 and torch.equal(masks[1], masks[0].flip(-1))


def test_mask_of_another_size_and_explicit_buckets_off_the_stride_are_errors(tmp_path):
    data = _bucketed_folder(tmp_path)
    Image.new("L", (10, 10), 255).save(data / "2_wide" / "w1_mask.png")
    with pytest.raises(DataError, match="its mask is 10×10 pixels but the image is 48×24"):
        prepare_training_set(DataConfig(source=str(data), resolution=32, on_bad_image="error"), progress=False)
    (data / "2_wide" / "w1_mask.png").unlink()
    with pytest.raises(DataError, match="data.buckets: \\[24, 40\\] is not a multiple of 16 px"):
        prepare_training_set(DataConfig(source=str(data), resolution=32, buckets=[[32, 32], [24, 40]]), progress=False, stride=16)


def test_masks_from_an_imagefolder_and_from_a_mask_column(tmp_path):
    import json

    Image.new("RGB", (16, 8), (200, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 8), (0, 200, 0)).save(tmp_path / "b.png")
    half = np.zeros((8, 16), dtype=np.uint8)
    half[:, 8:] = 255
    Image.fromarray(half).save(tmp_path / "a_mask.png")  # next to a.png: found, not read as an image
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": f}) + "\n" for f in ("a.png", "b.png")))
    data = prepare_training_set(DataConfig(source=str(tmp_path), resolution=8), progress=False)
    assert len(data) == 2 and data.masks[1] is None and data.mask(1, False, None) is None
    assert data.mask(0, False, None)[0].tolist() == [[0.0] * 4 + [1.0] * 4] * 8  # 16×8 → 8 wide after the centre crop
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "rows.csv").write_text("path,caption,region\na.png,a,a_mask.png\nb.png,b,a_mask.png\n")
    column = prepare_training_set(DataConfig(source=str(tmp_path / "rows.csv"), resolution=8, mask_column="region"), progress=False)
    assert torch.equal(column.mask(1, True, None), data.mask(0, True, None))


def test_generate_refuses_a_size_the_vae_cannot_make(tmp_path):
    from sdtune.config import ConfigError
    from sdtune.generation import generate

    with pytest.raises(ConfigError, match="--width: 30 is not a positive multiple of 8"):
        generate(tmp_path, ["a red circle"], width=30, height=32)


def test_sdxl_time_ids_carry_each_samples_real_size_crop_and_bucket(family_model, tmp_path, monkeypatch):
    from sdtune.models.sdxl import StableDiffusionXL

    seen = []
    real = StableDiffusionXL.predict

    def spy(self, noisy, timesteps, conditioning):
        seen.append((tuple(noisy.shape[-2:]), conditioning["time_ids"].clone()))
        return real(self, noisy, timesteps, conditioning)

    monkeypatch.setattr(StableDiffusionXL, "predict", spy)
    data = _bucketed_folder(tmp_path / "data")
    raw = {"name": "xl", "model": str(family_model("sdxl")),
           "data": {"source": str(data), "resolution": 32, "buckets": "auto", "center_crop": False, "random_flip": True},
           "train": {"batch_size": 3, "max_train_steps": 3, "checkpointing_steps": None},
           "techniques": {"lora": {"kind": "lora", "rank": 2}}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    record = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'out'}"]), "lora", progress=False).record
    vae_factor = 2  # the tiny SDXL VAE
    for latent_size, time_ids in seen:
        for original_h, original_w, top, left, target_h, target_w in time_ids.tolist():
            assert (original_h, original_w) in ((24.0, 48.0), (50.0, 26.0))  # the image's own size
            assert (target_h, target_w) == (latent_size[0] * vae_factor, latent_size[1] * vae_factor)  # its bucket
            assert (original_w > original_h) == (target_w > target_h) and top >= 0 and left >= 0
    assert len({latent for latent, _ in seen}) == 2 == len(record["data"]["buckets"])  # both buckets trained


@pytest.mark.slow
def test_two_processes_train_a_bucketed_run_like_one(tiny_model, tmp_path):
    """2 CPU processes × batch 1 × accumulation 2 == 1 process × batch 4: the same bucket on every
    micro-step of both processes (a mixed step could not even be stacked) and the same weights."""
    import json
    import subprocess
    import sys

    data = _bucketed_folder(tmp_path / "data")
    raw = {"name": "b2", "model": str(tiny_model),
           "data": {"source": str(data), "resolution": 32, "buckets": "auto", "center_crop": True, "random_flip": True},
           "train": {"batch_size": 1, "gradient_accumulation_steps": 2, "max_train_steps": 3, "learning_rate": 1e-3,
                     "checkpointing_steps": None, "log_every": 1},
           "techniques": {"lora": {"kind": "lora", "rank": 2}}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sdtune",
               "train", str(path), "--technique", "lora", "--output", str(tmp_path / "two"), "--no-progress"]
    two = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    record = json.loads((tmp_path / "two" / "lora" / "record.json").read_text())
    one = train_technique(load_experiment(path, ["train.batch_size=4", "train.gradient_accumulation_steps=1",
                                                 f"output_dir={tmp_path / 'one'}"]), "lora", progress=False)
    a, b = load_file(tmp_path / "two" / "lora" / "unet_adapter.safetensors"), load_file(one.run_dir / "unet_adapter.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert np.allclose([h["loss"] for h in record["loss_history"]], [h["loss"] for h in one.record["loss_history"]], rtol=1e-5)
