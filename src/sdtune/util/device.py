"""Which device sdtune computes on, and waiting for it."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """CUDA, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def on_cpu() -> bool:
    """True when training runs on the CPU: no GPU here, or the user asked for the CPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return default_device().type == "cpu"


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished all queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
