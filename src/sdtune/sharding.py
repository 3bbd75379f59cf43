"""Sharded training through accelerate: FSDP2 (``torch.distributed.fsdp.fully_shard``).

``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP=true`` and ``FSDP_VERSION=2``;
the loop then hands accelerate the trained model and the optimizer together (FSDP2 replaces the
parameters with sharded DTensors and accelerate moves the optimizer onto them). Frozen parts
(VAE, text encoders that do not train) stay whole on every process. Gradient accumulation keeps
the loop's explicit ``no_sync`` (FSDP2: ``set_requires_gradient_sync(False)``, one reduce-scatter
on the last micro-step). EMA is kept sharded like the parameters it follows.

Checkpoints and the saved weights have the same layout as on one process: sharded tensors are
gathered (every process takes part; rank 0 writes), and a resumed run cuts the full tensors back
into this run's shards, so a run may resume on another number of processes, sharded or not.

accelerate routes FSDP only to GPUs; on a CPU process group (gloo) the same FSDP2 code path is
switched on here (:func:`configure`), which is how it is tested on CPUs. DeepSpeed is refused with
one line (see :data:`DEEPSPEED_REFUSAL`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sdtune.errors import UserError

DEEPSPEED_REFUSAL = (
    "DeepSpeed (ACCELERATE_USE_DEEPSPEED) is not supported by sdtune's loop yet; use FSDP2 instead: "
    "`accelerate launch --use_fsdp --fsdp_version 2 -m sdtune train …` (README: Several processes)"
)


class ShardingError(UserError, RuntimeError):
    """A sharded setup (FSDP/DeepSpeed) that sdtune cannot run as asked."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def configure(accelerator: Any, config: Any, trained: list[str]) -> bool:
    """Check the sharding the launcher asked for and switch it on; True when the run is sharded.

    ``trained``: the bundle's components that train. FSDP2 on a CPU group is switched on here
    (accelerate leaves a CPU group on DDP); FSDP1, DeepSpeed and option combinations the sharded
    path cannot run are refused in one line instead of silently running something else.
    """
    from accelerate.utils import DistributedType

    if _flag("ACCELERATE_USE_DEEPSPEED") or accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ShardingError(DEEPSPEED_REFUSAL)
    if not (_flag("ACCELERATE_USE_FSDP") or accelerator.distributed_type == DistributedType.FSDP):
        return False
    if accelerator.num_processes == 1:
        return False  # one process holds everything anyway: the plain path, same numbers
    if accelerator.device.type == "cpu" and getattr(accelerator.state, "fsdp_plugin", None) is None:
        _fsdp_on_cpu_group(accelerator, config.mixed_precision)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 2:
        raise ShardingError(
            "FSDP1 is not supported (its flat parameters break saving the trained tensors by name); "
            "set fsdp_version: 2 in the accelerate config (or FSDP_VERSION=2)"
        )
    if len(trained) > 1:
        raise ShardingError(
            f"FSDP2 trains one model, but this technique trains {', '.join(trained)}; set "
            "train_text_encoder: false for the sharded run, or launch without FSDP (DDP)"
        )
    if config.compile:
        raise ShardingError("train.compile: true is not supported with FSDP2; set train.compile: false")
    if config.use_8bit_adam:
        raise ShardingError("train.use_8bit_adam is not supported with FSDP2 (sharded parameters); set it to false")
    return True


def _fsdp_on_cpu_group(accelerator: Any, mixed_precision: str) -> None:
    """Route a CPU (gloo) group to accelerate's FSDP2 path, as accelerate does for a GPU group.

    accelerate's state picks FSDP only for GPU-like devices; torch's ``fully_shard`` itself runs on
    CPUs with gloo. Everything after this (prepare, no_sync, clipping) is accelerate's own FSDP2 code.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
    if mixed_precision != "no" and plugin.fsdp_version == 2:
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # as accelerate's own state does for a GPU group: every later AcceleratorState() re-reads it
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def prepare(accelerator: Any, models: list[torch.nn.Module], optimizer: Any) -> tuple[list[torch.nn.Module], Any]:
    """Prepare the trained models and their optimizer in one call (FSDP2 needs them together:
    sharding replaces the parameters the optimizer holds)."""
    prepared = accelerator.prepare(*models, optimizer)
    return list(prepared[:-1]), prepared[-1]


def _is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gathered(value: Any) -> Any:
    """``value`` (nested dicts/lists/tuples) with every sharded tensor gathered whole.

    A collective: every process must call it, with the same structure, in the same order."""
    if _is_sharded(value):
        return value.full_tensor()
    if isinstance(value, dict):
        return {key: gathered(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(gathered(item) for item in value)
    return value


def shard_like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` cut into this process's shard of ``reference`` (a plain tensor stays as it is)."""
    if not _is_sharded(reference) or _is_sharded(full):
        return full
    from torch.distributed.tensor import distribute_tensor

    # every process holds the same full tensor (read from the checkpoint), so no data moves
    full = full.to(reference.device, reference.dtype)
    return distribute_tensor(full, reference.device_mesh, reference.placements, src_data_rank=None)


def shard_parameters(parameters: dict[str, torch.nn.Parameter], full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved full tensors shaped like the live (maybe sharded) parameters of the same names."""
    return {name: shard_like(parameters[name], tensor) if name in parameters else tensor for name, tensor in full.items()}


def shard_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """A gathered optimizer state (torch's layout: states by parameter index) cut into the shards
    of the optimizer's live parameters; per-parameter scalars (Adam's ``step``) stay as they are."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entries in saved["state"].items():
        parameter = parameters[index]
        state[index] = {
            key: shard_like(parameter, value)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(parameter.shape) and value.dim() > 0
            else value
            for key, value in entries.items()
        }
    return {**saved, "state": state}


def shard_ema_state(parameters: list[torch.nn.Parameter], saved: dict[str, Any]) -> dict[str, Any]:
    """A gathered EMA state with its shadow weights cut like the parameters they follow."""
    shadows = saved.get("shadow_params") or []
    return {**saved, "shadow_params": [shard_like(p, s) for p, s in zip(parameters, shadows)]}
