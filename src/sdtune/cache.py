"""Encode each training image once: cached VAE posteriors and text conditioning.

With a frozen VAE and text encoders, their outputs are the same every epoch, so a training step
only needs the denoiser. We cache the posterior (mean, std), not a latent, so every step still
draws a fresh latent (see :func:`sdtune.diffusion.sample_latents`); with ``random_flip`` both flip
variants are cached. The text conditioning is whatever the family's ``encode_prompt`` returns
(SD1: hidden states; SDXL: states and pooled embedding; SD3: CLIP+T5 states and pooled), each
tensor cached under its own name. The disk cache is keyed by everything that changes its content
and reused by every technique and run of an experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdtune.data import TrainingSet

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # pixels → (mean, std)
TextEncoder = Callable[[list[str]], dict[str, torch.Tensor]]  # captions → conditioning tensors

_MEMORY: dict[str, LatentCache] = {}  # reused across techniques trained in one process


@dataclass
class LatentCache:
    """Per-sample posterior (mean, std) for each flip variant, and optionally the text conditioning."""

    key: str
    flips: tuple[bool, ...]
    means: torch.Tensor | None = None  # (variants, N, C, h, w) in memory mode
    stds: torch.Tensor | None = None
    texts: dict[str, torch.Tensor] | None = None  # name → (N, …) in memory mode
    folder: Path | None = None  # disk mode: one safetensors file per sample
    has_texts: bool = False

    def posterior(self, indices: list[int], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.folder is None:
            variant = torch.tensor([self.flips.index(f) for f in flips])
            index = torch.tensor(indices)
            return self.means[variant, index], self.stds[variant, index]
        records = [load_file(self.folder / f"{i:08d}.safetensors") for i in indices]
        means = torch.stack([r["mean"][self.flips.index(f)] for r, f in zip(records, flips)])
        stds = torch.stack([r["std"][self.flips.index(f)] for r, f in zip(records, flips)])
        return means, stds

    def text(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The cached text conditioning of these samples, batch-first."""
        if self.folder is None:
            rows = torch.tensor(indices)
            return {name: values[rows] for name, values in self.texts.items()}
        records = [load_file(self.folder / f"{i:08d}.safetensors") for i in indices]
        names = [key[len(TEXT_PREFIX):] for key in records[0] if key.startswith(TEXT_PREFIX)]
        return {name: torch.stack([r[TEXT_PREFIX + name] for r in records]) for name in names}


TEXT_PREFIX = "text."  # disk records: "mean", "std", and "text.<conditioning name>"


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def estimate_bytes(num_samples: int, latent_numel: int, variants: int, text_numel: int) -> int:
    """Bytes of a float32 cache: mean+std of each latent variant, plus the text conditioning
    (``text_numel`` from the real shapes: SD3's T5 states alone are 77 × 4096 values a caption)."""
    return 4 * num_samples * (2 * latent_numel * variants + text_numel)


def build_cache(
    training_set: TrainingSet,
    encode_images: Encoder,
    encode_texts: TextEncoder | None,
    key: str,
    mode: str,
    folder: Path,
    progress: bool = True,
) -> LatentCache:
    """Encode every image (both flips when random_flip) and caption once; ``mode`` is memory or disk."""
    from tqdm.auto import tqdm

    flips = (False, True) if training_set.config.random_flip else (False,)
    if mode == "memory" and key in _MEMORY:
        return _MEMORY[key]
    target = folder / key
    if mode == "disk" and (target / "complete").exists():
        return LatentCache(key=key, flips=flips, folder=target, has_texts=encode_texts is not None)
    batch = training_set.config.cache_batch_size
    means, stds, texts = [], [], {}
    if mode == "disk":
        partial = folder / f"{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    for start in tqdm(range(0, len(training_set), batch), desc="caching latents", disable=not progress):
        rows = list(range(start, min(start + batch, len(training_set))))
        variant_means, variant_stds = [], []
        for flip in flips:
            pixels = torch.stack([training_set.pixels(i, flip, None) for i in rows])
            mean, std = encode_images(pixels)
            variant_means.append(mean.float().cpu())
            variant_stds.append(std.float().cpu())
        mean_block, std_block = torch.stack(variant_means, 1), torch.stack(variant_stds, 1)  # (B, V, …)
        text_block = {}
        if encode_texts is not None:
            encoded = encode_texts([training_set.captions[i] for i in rows])
            text_block = {name: value.float().cpu() for name, value in encoded.items()}
        if mode == "disk":
            for j, i in enumerate(rows):
                record = {"mean": mean_block[j].contiguous(), "std": std_block[j].contiguous()}
                record.update({TEXT_PREFIX + name: value[j].contiguous() for name, value in text_block.items()})
                save_file(record, partial / f"{i:08d}.safetensors")
        else:
            means.append(mean_block)
            stds.append(std_block)
            for name, value in text_block.items():
                texts.setdefault(name, []).append(value)
    if mode == "disk":
        (partial / "complete").write_text("ok")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)  # atomic: a half-written cache is never used
        return LatentCache(key=key, flips=flips, folder=target, has_texts=encode_texts is not None)
    cache = LatentCache(
        key=key,
        flips=flips,
        means=torch.cat(means).transpose(0, 1).contiguous(),
        stds=torch.cat(stds).transpose(0, 1).contiguous(),
        texts={name: torch.cat(values) for name, values in texts.items()} if texts else None,
        has_texts=encode_texts is not None,
    )
    _MEMORY.clear()  # keep one experiment's cache, not every one ever built
    _MEMORY[key] = cache
    return cache
