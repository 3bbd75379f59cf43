"""``sdtune train --estimate``: the breakdown adds up, the savers lower what they should, and the
estimate of a CPU run is within ±25 % of the peak its record measures.

Tiers: the breakdown tests are integration (a tiny model on the meta device, seconds); the check
against a measured run is slow (a 71 M-parameter UNet trained one step in a fresh process).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import sdtune
from sdtune.config import ConfigError
from sdtune.experiment import load_experiment
from sdtune.training.estimate import parse_bytes


def test_parse_bytes_reads_card_sizes_and_refuses_the_rest():
    assert parse_bytes("24GB") == parse_bytes("24 GiB") == 24 * 2**30
    assert parse_bytes("8000MB") == 8000 * 2**20
    with pytest.raises(ConfigError, match="--budget: 'lots' is not a size"):
        parse_bytes("lots")


def test_estimate_breakdown_and_savers(write_experiment):
    """Full fine-tuning: gradients and AdamW moments are 4 and 8 bytes a trained value; 8-bit AdamW
    and fused backward take off what they claim; checkpointing saves fewer activations."""
    experiment = load_experiment(write_experiment(gradient_accumulation_steps=1, max_grad_norm=None))
    plain = sdtune.estimate_memory(experiment, ["full"])[0]
    numel = plain.trainable_parameters
    assert numel > 0 and plain.gradients == 4 * numel and plain.optimizer_states == 8 * numel
    assert plain.ema == 4 * numel  # (the fixture's full technique keeps an EMA)
    assert plain.total == sum(plain.weights.values()) + plain.optimizer_states + plain.ema + plain.step_peak
    assert plain.activations_other < plain.activations  # the other way round: with checkpointing
    fused = sdtune.estimate_memory(load_experiment(write_experiment(
        gradient_accumulation_steps=1, max_grad_norm=None, fused_backward=True)), ["full"])[0]
    assert fused.step_peak < plain.step_peak and "freed tensor by tensor" in fused.describe()
    lora = sdtune.estimate_memory(experiment, ["lora"], budget="1GB")[0]
    assert lora.fits_with == [] and lora.trainable_parameters < numel / 10
    assert "fits the budget with" in lora.describe()


def test_a_budget_too_small_names_the_savers_tried(write_experiment):
    experiment = load_experiment(write_experiment())
    tight = sdtune.estimate_memory(experiment, ["full"], budget=1000)[0]
    assert tight.fits_with is None and "does not fit" in tight.notes[0]


@pytest.mark.slow
def test_estimate_is_within_a_quarter_of_the_measured_cpu_peak(tmp_path):
    """A UNet of 71 M parameters (weights, gradients and moments ≈ 1.1 GB) fine-tuned in full at
    128 px: the estimate for this CPU (with the process's own memory) against the record's peak RSS."""
    from conftest import WORDS, make_imagefolder

    from sdtune.testing.tiny import TinySizes, build_tiny_pipeline

    sizes = TinySizes(unet_channels=(128, 256, 512), unet_layers_per_block=2, vae_channels=(32, 64, 64), text_hidden=256,
                      text_layers=4, norm_groups=32, sample_size=32)
    build_tiny_pipeline(tmp_path / "model", words=WORDS, sizes=sizes)
    raw = {
        "name": "mid", "model": str(tmp_path / "model"), "output_dir": str(tmp_path / "runs"),
        "data": {"source": str(make_imagefolder(tmp_path / "data", size=140)), "resolution": 128, "center_crop": True},
        "train": {"batch_size": 2, "max_train_steps": 1, "checkpointing_steps": None},
        "techniques": {"full": {"kind": "full"}},
    }
    path = tmp_path / "mid.yaml"
    path.write_text(yaml.safe_dump(raw))
    estimate = sdtune.estimate_memory(load_experiment(path), device="cpu")[0]
    subprocess.run([sys.executable, "-m", "sdtune", "train", str(path), "--no-progress"], check=True, capture_output=True)
    measured = json.loads((tmp_path / "runs" / "full" / "record.json").read_text())["memory"]["peak"]["bytes"]
    assert abs(estimate.total - measured) / measured <= 0.25, (estimate.describe(), measured)
