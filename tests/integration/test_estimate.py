"""``sdtune train --estimate``: the breakdown adds up, the savers lower what they should, and the
estimate of a CPU run is within ±25 % of the peak its record measures.

Tiers: the breakdown tests are integration (a tiny model on the meta device, seconds); the check
against measured runs is slow (a 71 M-parameter UNet trained two steps, in full and with LoRA, each
in a fresh process).
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


def test_a_cpu_estimate_adds_the_process_and_mallocs_free_blocks(write_experiment):
    """On a CPU the total is the process's resident memory: the interpreter and its libraries, and
    the heap malloc keeps beyond the live tensors (its measured share of what a step allocates)."""
    from sdtune.training.estimate import HEAP_KEPT_FRACTION
    from sdtune.util.allocator import malloc_in_use

    experiment = load_experiment(write_experiment(gradient_accumulation_steps=1))
    gpu, cpu = (sdtune.estimate_memory(experiment, ["lora"], device=device)[0] for device in ("cuda", "cpu"))
    assert gpu.process == gpu.heap_kept == 0 and gpu.malloc == ""
    assert cpu.malloc == malloc_in_use() and cpu.process > 100 * 2**20  # (torch alone is more)
    assert cpu.step_allocated >= cpu.step_peak > 0
    share = HEAP_KEPT_FRACTION.get(cpu.malloc, HEAP_KEPT_FRACTION["glibc"])
    assert cpu.heap_kept == int(share * cpu.step_allocated)
    assert cpu.total == gpu.total + cpu.process + cpu.heap_kept
    assert "the process itself" in cpu.describe() and "malloc's free blocks" in cpu.describe()


def test_a_budget_too_small_names_the_savers_tried(write_experiment):
    experiment = load_experiment(write_experiment())
    tight = sdtune.estimate_memory(experiment, ["full"], budget=1000)[0]
    assert tight.fits_with is None and "does not fit" in tight.notes[0]


@pytest.mark.slow
def test_estimate_is_within_a_quarter_of_the_measured_cpu_peak(tmp_path):
    """A UNet of 71 M parameters at 128 px, fine-tuned in full (weights, gradients and moments ≈ 1.1 GB)
    and with LoRA (where the step's activations and malloc's heap are most of the peak): each
    estimate for this CPU against the record's peak RSS of its own fresh process. Two steps: the
    first is not the steady state (the moments are made after its peak, in the holes its activations
    left; glibc's heap still grows in the second)."""
    from conftest import WORDS, make_imagefolder

    from sdtune.testing.tiny import TinySizes, build_tiny_pipeline

    sizes = TinySizes(unet_channels=(128, 256, 512), unet_layers_per_block=2, vae_channels=(32, 64, 64), text_hidden=256,
                      text_layers=4, norm_groups=32, sample_size=32)
    build_tiny_pipeline(tmp_path / "model", words=WORDS, sizes=sizes)
    raw = {
        "name": "mid", "model": str(tmp_path / "model"), "output_dir": str(tmp_path / "runs"),
        "data": {"source": str(make_imagefolder(tmp_path / "data", size=140)), "resolution": 128, "center_crop": True},
        "train": {"batch_size": 2, "max_train_steps": 2, "checkpointing_steps": None},
        "techniques": {"full": {"kind": "full"}, "lora": {"kind": "lora"}},
    }
    path = tmp_path / "mid.yaml"
    path.write_text(yaml.safe_dump(raw))
    estimates = {e.technique: e for e in sdtune.estimate_memory(load_experiment(path), device="cpu")}
    # (two techniques: each trains in its own fresh process, so each record's peak is its own)
    subprocess.run([sys.executable, "-m", "sdtune", "train", str(path), "--no-progress"], check=True, capture_output=True)
    errors = {}
    for name, estimate in estimates.items():
        measured = json.loads((tmp_path / "runs" / name / "record.json").read_text())["memory"]["peak"]["bytes"]
        errors[name] = (estimate.total - measured) / measured
    report = {name: f"{error:+.0%}" for name, error in errors.items()}
    assert all(abs(error) <= 0.25 for error in errors.values()), (report, [e.describe() for e in estimates.values()])
