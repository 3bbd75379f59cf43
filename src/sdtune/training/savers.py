"""The memory savers that depend on the device, checked when a run starts, and the moves of the
encoders that ``train.free_encoders`` parks on the CPU (what each saver does and saves: docs/memory.md).

The savers that only make sense with a GPU beside the CPU — paged optimizers, the optimizer
offload, parked encoders, block swap, model CPU offload for evaluation — are refused on a machine
without one, in one line: on a CPU they would have nowhere to move to, and a run that silently
did not save what it was asked to would be measured as if it had.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sdtune.config import ConfigError, EvaluationConfig, TrainConfig

# Where parked encoders and swapped blocks wait. The tests set it to "meta" on a CPU-only machine
# (the "fake device split"): a weight left there cannot be computed with, so a test run that
# finishes proves nothing used it while it was away (it proves nothing about transfer speed).
PARKING_DEVICE = "cpu"


class DeviceSaverError(ConfigError):
    """A memory saver that needs a GPU was asked for on a machine without one."""


def cuda_only_savers(config: TrainConfig, evaluation: EvaluationConfig) -> list[tuple[str, str]]:
    """(key as written, why it needs a GPU) of each CUDA-only saver the run asks for."""
    asked = [
        (config.optimizer.startswith("paged_"), f"train.optimizer: {config.optimizer}", "pages GPU memory out to the CPU"),
        (config.optimizer_offload, "train.optimizer_offload: true", "moves the optimizer from the GPU to the CPU"),
        (config.free_encoders, "train.free_encoders: true", "moves the encoders from the GPU to the CPU"),
        (config.block_swap > 0, f"train.block_swap: {config.block_swap}", "keeps GPU blocks on the CPU"),
        (evaluation.cpu_offload, "evaluation.cpu_offload: true", "moves each model to the GPU only for its forward"),
    ]
    return [(key, why) for wanted, key, why in asked if wanted]


def check_device(config: TrainConfig, evaluation: EvaluationConfig, device: torch.device) -> None:
    """Refuse, in one line, a saver this device cannot honour (see the module docstring)."""
    if device.type == "cuda" or PARKING_DEVICE != "cpu":
        return
    for key, why in cuda_only_savers(config, evaluation):
        raise DeviceSaverError(f"{key} needs a CUDA GPU (it {why}); remove it on this {device.type} machine")


def parking_device() -> torch.device:
    return torch.device(PARKING_DEVICE)


@contextlib.contextmanager
def modules_on(modules: list[torch.nn.Module], device: torch.device, per_forward: bool = False) -> Iterator[None]:
    """Bring parked ``modules`` to ``device`` for the block (an evaluation during training), and park
    them again after. ``per_forward`` (``evaluation.cpu_offload``): each comes in only for its own
    forward and leaves when the next one runs, through the hook diffusers' ``enable_model_cpu_offload``
    installs (accelerate's ``cpu_offload_with_hook``)."""
    if not modules:
        yield
        return
    parked = [next(module.parameters()).device for module in modules]
    hooks = []
    if per_forward:
        from accelerate import cpu_offload_with_hook

        previous = None
        for module in modules:
            _, previous = cpu_offload_with_hook(module, device, prev_module_hook=previous)
            hooks.append(previous)
    else:
        for module in modules:
            module.to(device)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()  # (takes the hook off the module and moves it back to the CPU)
        for module, where in zip(modules, parked):
            module.to(where)
