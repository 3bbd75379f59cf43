"""Encode each training sample at most once, the first time the data order uses it.

With a frozen VAE and text encoders their outputs are the same every epoch, so a step only needs
the denoiser once a sample has been seen. The cache is filled lazily: an (image, flip) pair is
encoded the first time the deterministic order reaches it, so a run never encodes more than the
uncached path would (a 2-epoch run encodes each used pair once instead of twice), and nothing is
encoded before step 1. We cache the posterior (mean, std), not a latent, so every step still draws
a fresh latent (:func:`sdtune.diffusion.sample_latents`). The text conditioning is whatever the
family's ``encode_prompt`` returns (SD1: hidden states; SDXL: states and pooled embedding; SD3:
CLIP+T5 states and pooled), each tensor cached under its own name.

Every sample is encoded alone (a batch of one), so its cached value does not depend on which
other samples happened to be encoded with it: a resumed run, another technique or another process
gets the same bits. The disk cache is one safetensors file per entry, written atomically (a
temporary file renamed into place), so techniques, runs and processes share it and may fill it at
the same time; it is keyed by everything that changes its content.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdtune.errors import first_line
from sdtune.util import atomic

log = logging.getLogger(__name__)

Posterior = tuple[torch.Tensor, torch.Tensor]  # (mean, std) of one sample, float32, on the CPU
TEXT_PREFIX = "text."  # text files hold "text.<conditioning name>" tensors


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def estimate_bytes(num_samples: int, latent_numel: int, variants: int, text_numel: int) -> int:
    """Bytes of a float32 cache: mean+std of each latent variant, plus the text conditioning
    (``text_numel`` from the real shapes: SD3's T5 states alone are 77 × 4096 values a caption)."""
    return 4 * num_samples * (2 * latent_numel * variants + text_numel)


@dataclass
class LatentCache:
    """Posteriors per (sample, flip) and, optionally, text conditioning per sample; in memory, or
    on disk under ``folder`` (shared)."""

    key: str
    caches_texts: bool
    folder: Path | None = None  # disk mode
    encoded_images: int = 0
    encoded_texts: int = 0
    _posteriors: dict[tuple[int, bool], Posterior] = field(default_factory=dict)
    _texts: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "disk" if self.folder is not None else "memory"

    # -- posteriors ---------------------------------------------------------------------------
    def has_posterior(self, index: int, flip: bool) -> bool:
        if self.folder is None:
            return (index, flip) in self._posteriors
        return self._latent_path(index, flip).exists()

    def posterior(self, index: int, flip: bool) -> Posterior | None:
        if self.folder is None:
            return self._posteriors.get((index, flip))
        tensors = _read(self._latent_path(index, flip))
        return None if tensors is None else (tensors["mean"], tensors["std"])

    def put_posterior(self, index: int, flip: bool, mean: torch.Tensor, std: torch.Tensor) -> Posterior:
        """Store (as float32 on the CPU, exactly what a later read returns) and return it."""
        mean, std = mean.float().cpu().contiguous(), std.float().cpu().contiguous()
        if self.folder is None:
            self._posteriors[(index, flip)] = (mean, std)
        else:
            atomic.save_tensors(self._latent_path(index, flip), {"mean": mean, "std": std})
        return mean, std

    # -- text conditioning --------------------------------------------------------------------
    def text(self, index: int) -> dict[str, torch.Tensor] | None:
        if self.folder is None:
            return self._texts.get(index)
        tensors = _read(self.folder / f"{index:08d}-text.safetensors")
        return None if tensors is None else {k[len(TEXT_PREFIX):]: v for k, v in tensors.items()}

    def put_text(self, index: int, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store (as float32 on the CPU, exactly what a later read returns) and return it."""
        values = {name: value.float().cpu().contiguous() for name, value in conditioning.items()}
        if self.folder is None:
            self._texts[index] = values
        else:
            path = self.folder / f"{index:08d}-text.safetensors"
            atomic.save_tensors(path, {TEXT_PREFIX + name: value for name, value in values.items()})
        return values

    def _latent_path(self, index: int, flip: bool) -> Path:
        return self.folder / f"{index:08d}-{'flip' if flip else 'orig'}.safetensors"


def open_cache(key: str, mode: str, root: Path, caches_texts: bool, description: dict) -> LatentCache:
    """A memory cache, or the disk cache ``root/key`` (created, with a description of its key)."""
    if mode == "memory":
        return LatentCache(key=key, caches_texts=caches_texts)
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "cache.json"
    if not info.exists():
        atomic.write_text(info, json.dumps(description, indent=2, sort_keys=True, default=str))
    return LatentCache(key=key, caches_texts=caches_texts, folder=folder)


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    """An entry's tensors; None when it is missing, or unreadable (written by a process that died
    before the atomic writes, a damaged disk): it is then encoded again and replaced whole."""
    try:
        return load_file(path)
    except FileNotFoundError:
        return None
    except Exception as error:  # safetensors' own error type for a damaged file
        log.warning("latent cache entry %s is unreadable (%s); encoding it again", path, first_line(error))
        return None
