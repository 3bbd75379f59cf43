"""Sharded training through accelerate: FSDP2 (``torch.distributed.fsdp.fully_shard``) and
DeepSpeed ZeRO stages 1–3, in fp32 or bf16 (fp16 on CUDA).

``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP=true`` and ``FSDP_VERSION=2``;
the loop then hands accelerate the trained model and the optimizer together (FSDP2 replaces the
parameters with sharded DTensors and accelerate moves the optimizer onto them). Several trained
components (a text encoder too) are handed over as one container model (:func:`prepare`), since
accelerate prepares one model for FSDP2/DeepSpeed. Frozen parts (VAE, text encoders that do not
train) stay whole on every process. Gradient accumulation is
accelerate's ``accumulate()`` (FSDP2: ``set_requires_gradient_sync(False)``, one reduce-scatter
on the last micro-step). EMA is kept sharded like the parameters it follows.

Checkpoints and the saved weights have the same layout as on one process, so a run may resume on
another number of processes, sharded or not. FSDP2, DDP and one process alike go through torch's
distributed-checkpoint state-dict API (``torch.distributed.checkpoint.state_dict``) with full state
dicts: ``get_model_state_dict``/``get_optimizer_state_dict`` gather the trained tensors (frozen ones
left out) and Adam's state whole onto rank 0's CPU (every process takes part; rank 0 writes), and
``set_model_state_dict``/``set_optimizer_state_dict`` cut a checkpoint's whole tensors into this
run's shards. The trained components are handed to it as one :class:`TrainedComponents` of the
unwrapped modules, so its names are sdtune's, ``<component>.<parameter>``; the optimizer's state is
stored in torch's index layout, counted through the param groups in their order. The EMA is neither
a module nor an optimizer: its FSDP2 shards go through DTensor's ``full_tensor``/``distribute_tensor``.

DeepSpeed: ``accelerate launch`` with a DeepSpeed config sets ``ACCELERATE_USE_DEEPSPEED=true``;
the micro-batch, accumulation and clipping of the DeepSpeed config are filled from the train
section, the engine accumulates (the loop marks the last micro-step) and steps. With bf16/fp16 the
engine casts the trained model to that dtype and the loop feeds the denoiser its inputs in it
(:func:`input_dtype`); the noising maths and the loss stay fp32. What is saved comes from the
optimizer's fp32 master weights (``safe_get_full_fp32_param``) and Adam moments
(``safe_get_full_optimizer_state``), written back with ``safe_set_full_*``; EMA follows the fp32
master weights, each process its fragment. (torch's state-dict API knows FSDP, DDP and DTensors, not
ZeRO's flat partitions or its fp32 master weights, hence DeepSpeed's own helpers.) Under ZeRO-3
models load whole (:func:`load_whole`) and the engine partitions only the trained model.

accelerate routes FSDP and DeepSpeed only to GPUs; on a CPU process group (gloo) the same code
paths are switched on here (:func:`configure`), which is how both are tested on CPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from sdtune.errors import UserError
from sdtune.models.quantize import quantization_of
from sdtune.preflight import sharded_option_problem
from sdtune.training.checkpoint import check_trainable_names

FSDP2, DEEPSPEED = "fsdp2", "deepspeed"


class ShardingError(UserError, RuntimeError):
    """A sharded setup (FSDP/DeepSpeed) that sdtune cannot run as asked."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


_routed_from: list[Any] = []  # the CPU group's own distributed type, while routed to FSDP/DeepSpeed


def before_accelerator() -> None:
    """Before each Accelerator: undo an earlier technique's routing (a fresh Accelerator routes
    again), and check that a DeepSpeed launch has the deepspeed package (an optional one)."""
    from accelerate.state import PartialState

    if _routed_from:
        PartialState._shared_state["distributed_type"] = _routed_from.pop()
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ShardingError(
                "the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED) but deepspeed is not installed: "
                "`pip install deepspeed`, or launch with FSDP2 instead"
            ) from None


def configure(accelerator: Any, config: Any) -> str | None:
    """Check the sharding the launcher asked for and switch it on: "fsdp2", "deepspeed" or None.

    On a CPU group (where accelerate leaves DDP) FSDP2 and DeepSpeed are switched on here; FSDP1 and option combinations the sharded paths cannot
    run are refused in one line instead of silently running something else.
    """
    from accelerate.utils import DistributedType

    chosen = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)  # by accelerate (GPUs)
    deepspeed = _flag("ACCELERATE_USE_DEEPSPEED") or accelerator.distributed_type == DistributedType.DEEPSPEED
    fsdp = _flag("ACCELERATE_USE_FSDP") or accelerator.distributed_type == DistributedType.FSDP
    if not chosen and (accelerator.num_processes == 1 or not (deepspeed or fsdp)):
        return None  # (one CPU process holds everything anyway: the plain path, the same numbers)
    if deepspeed:
        return _configure_deepspeed(accelerator, config)
    if accelerator.device.type == "cpu" and getattr(accelerator.state, "fsdp_plugin", None) is None:
        _fsdp_on_cpu_group(accelerator, config.mixed_precision)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 2:
        raise ShardingError(
            "FSDP1 is not supported (its flat parameters break saving the trained tensors by name); "
            "set fsdp_version: 2 in the accelerate config (or FSDP_VERSION=2)"
        )
    _check_options(config, "FSDP2")
    return FSDP2


def check_evaluation_during_training(accelerator: Any, sharded: str | None, use_ema: bool, evaluates: bool) -> None:
    """Evaluation during training (validation loss, images) runs the live model on the main process
    alone while the others wait: refused where that process does not hold the whole weights it
    would evaluate (before anything loads)."""
    if not evaluates or sharded is None:
        return
    if sharded == FSDP2:
        reason = "FSDP2 shards the trained weights over the processes"
    elif _zero_stage(accelerator) == 3:
        reason = "DeepSpeed ZeRO-3 partitions the trained weights over the processes"
    elif use_ema:
        reason = "under DeepSpeed each process keeps only its fragment of the EMA weights (train.use_ema)"
    else:
        return  # ZeRO-1/2 without EMA: every process holds the whole weights
    raise ShardingError(
        f"evaluation during training (evaluation.every_steps, data.validation) runs on the main process alone, but "
        f"{reason}; for this launch remove both (`sdtune compare` evaluates the finished model), or launch without sharding"
    )


def _zero_stage(accelerator: Any) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = None if plugin is None else (plugin.deepspeed_config.get("zero_optimization") or {}).get("stage", plugin.zero_stage)
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def _check_options(config: Any, what: str) -> None:
    problem = sharded_option_problem(config, what)
    if problem:
        raise ShardingError(problem)


def _configure_deepspeed(accelerator: Any, config: Any) -> str:
    """Route a CPU group to accelerate's DeepSpeed path; fill the DeepSpeed config from the train
    section, the one source of truth (a different value the launcher carried is replaced, and said)."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    _check_options(config, "DeepSpeed")
    state = accelerator.state
    if accelerator.device.type == "cpu" and getattr(state, "deepspeed_plugins", None) is None:
        plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables the launcher set
        plugin.set_mixed_precision(config.mixed_precision)  # bf16: the engine casts the model (fp16 needs CUDA)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state.distributed_type = DistributedType.DEEPSPEED
        _route(DistributedType.DEEPSPEED)
    load_whole(accelerator)
    plugin = state.deepspeed_plugin
    ds_config = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": (config.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (config.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "gradient_clipping": (config.max_grad_norm or 0.0, "train.max_grad_norm"),  # (0: none)
        "train_batch_size": (config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes, "the total batch"),
    }
    for key, (value, source) in wanted.items():
        given = ds_config.get(key, "auto")
        if given not in ("auto", value) and accelerator.is_main_process:
            print(f"DeepSpeed config {key}: {given} replaced by {value} ({source} of the experiment)")
        ds_config[key] = value
    return DEEPSPEED


def load_whole(accelerator: Any) -> None:
    """Models load whole from here on, also under ZeRO-3: the engine partitions only the trained
    model it is handed. accelerate's ``zero3_init_flag`` (on by default for ZeRO-3) keeps a
    transformers ``HfDeepSpeedConfig`` alive, which makes every later ``from_pretrained`` build its
    text encoders under ``deepspeed.zero.Init``: frozen encoders would be partitioned, and the fresh
    copy that rank 0 alone loads to save the weights waited for the other ranks forever (the hang)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero3_init_flag:
        plugin.zero3_init_flag = False
        plugin.dschf = None  # the only strong reference: transformers' weak one dies with it


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _fsdp_on_cpu_group(accelerator: Any, mixed_precision: str) -> None:
    """Route a CPU (gloo) group to accelerate's FSDP2 path, as accelerate does for a GPU group.

    accelerate's state picks FSDP only for GPU-like devices; torch's ``fully_shard`` itself runs on
    CPUs with gloo. Everything after this (prepare, no_sync, clipping) is accelerate's own FSDP2 code.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
    if mixed_precision != "no" and plugin.fsdp_version == 2:
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    _route(DistributedType.FSDP)


def _route(distributed_type: Any) -> None:
    """Set the process group's type as accelerate's own state does for a GPU group: every later
    ``AcceleratorState()`` re-reads it (undone by :func:`before_accelerator`)."""
    from accelerate.state import PartialState

    _routed_from.append(PartialState._shared_state["distributed_type"])
    PartialState._shared_state["distributed_type"] = distributed_type


def prepare(
    accelerator: Any, trained: dict[str, torch.nn.Module], optimizer: Any, sharded: str | None,
    device_placement: bool = True,
) -> tuple[dict[str, Any], list[torch.nn.Module], Any]:
    """Prepare the trained components and their optimizer in one call (FSDP2 needs them together:
    sharding replaces the parameters the optimizer holds). Returns what the bundle calls for each
    component, the prepared models (for ``train()`` and ``no_sync``), and the optimizer.

    FSDP2 and DeepSpeed prepare one model: several trained components (a text encoder too) are
    prepared as one :class:`TrainedComponents` container, and each is called through it."""
    if not sharded or len(trained) == 1:
        # (device_placement False: already placed, and block swap keeps some weights on the CPU)
        # (DeepSpeed places what its engine holds itself; accelerate refuses a placement list there)
        placement = None if sharded == DEEPSPEED else [device_placement] * (len(trained) + 1)
        prepared = accelerator.prepare(*trained.values(), optimizer, device_placement=placement)
        return dict(zip(trained, prepared[:-1])), list(prepared[:-1]), prepared[-1]
    container, optimizer = accelerator.prepare(TrainedComponents(trained), optimizer)
    inner = accelerator.unwrap_model(container)
    return {name: Routed(container, inner[name], name) for name in trained}, [container], optimizer


class TrainedComponents(torch.nn.ModuleDict):
    """The trained components as one model for FSDP2/DeepSpeed; ``container(name, …)`` calls one of
    them, so the wrapper's forward (FSDP2's root unshard, DeepSpeed's engine) runs around each call."""

    def forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self[name](*args, **kwargs)


class Routed:
    """A trained component as the bundle holds it while it is prepared inside a container: a call
    goes through the container; anything else (``dtype``, ``config``, ``parameters()``…) is the
    component's own."""

    def __init__(self, container: torch.nn.Module, module: torch.nn.Module, name: str) -> None:
        self.container, self.module, self.name = container, module, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.container(self.name, *args, **kwargs)

    def __getattr__(self, attribute: str) -> Any:  # (only for what the proxy itself does not have)
        return getattr(self.module, attribute)


def unrouted(component: Any) -> Any:
    """The component itself, out of a :class:`Routed` proxy."""
    return component.module if isinstance(component, Routed) else component


# ----------------------------------------------------------------------------------------------
# The loop's few sharding-aware steps


def input_dtype(accelerator: Any, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the denoiser's inputs are fed in. DeepSpeed's bf16/fp16 engine casts the trained
    model to that dtype and runs no autocast, so its inputs are cast as in diffusers' example scripts
    (``weight_dtype``); elsewhere fp32 goes in (autocast, or FSDP2's mixed precision, casts)."""
    return weight_dtype if is_deepspeed(accelerator) else torch.float32


# EMA under DeepSpeed follows the optimizer's fp32 master weights, this process's fragment of each
# (sharded like them, updated without communication); whole tensors are gathered only to save.


def ema_tensors(accelerator: Any, parameters: dict[str, torch.nn.Parameter]) -> list[torch.Tensor]:
    """What EMA averages and ``copy_to`` writes: the parameters (FSDP2: their shards), or under
    DeepSpeed this process's fragments of the fp32 master weights (views: written in place)."""
    if not is_deepspeed(accelerator):
        return list(parameters.values())
    return [_local_fp32(parameter) for parameter in parameters.values()]


def _local_fp32(parameter: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(parameter, "ds_id"):  # ZeRO-3: the partition the optimizer holds
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(parameter)
    mapping = getattr(parameter, "_hp_mapping", None)  # ZeRO-1/2: the fragment of the flat fp32 partition
    return mapping.get_hp_fragment() if mapping is not None else parameter.new_empty(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Whole tensors out, shards back in. FSDP2, DDP and one process: torch's distributed-checkpoint
# state-dict API with full state dicts. DeepSpeed: its own safe_get/set_full_* helpers, because that
# API knows FSDP/DDP/DTensor but not ZeRO's flat partitions and fp32 master weights (which hold the
# trained values under bf16/fp16).


def _state_root(
    components: Mapping[str, torch.nn.Module], parameters: dict[str, torch.nn.Parameter]
) -> torch.nn.Module:
    """The trained components (unwrapped: no DDP or compile wrapper; FSDP2 shards a module in place
    and keeps its names) as one module for torch's state-dict API, whose names (FQNs) are then
    sdtune's, ``<component>.<parameter>``, also when several are prepared as one container."""
    trained = dict.fromkeys(name.partition(".")[0] for name in parameters)
    return TrainedComponents({component: components[component] for component in trained})


def _to_rank_0(**options: bool) -> Any:
    """Options that gather whole tensors onto rank 0's CPU (``cpu_offload`` with ``full_state_dict``):
    rank 0 writes them; the other processes take part and get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **options)


def _from_whole(**options: bool) -> Any:
    """Options that load whole tensors, which every process read, into this process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


def full_parameters(
    accelerator: Any, components: Mapping[str, torch.nn.Module], parameters: dict[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """The trained tensors whole in fp32, as the model holds them (with EMA: after ``copy_to``), on the
    main process ({} on the others, which take part: a collective when sharded). DeepSpeed: its
    optimizer's fp32 master weights (the model itself may hold bf16/fp16 copies)."""
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(parameter) for name, parameter in parameters.items()}
    if accelerator.num_processes == 1 and any(quantization_of(module) for module in components.values()):
        # (a quantised base trains in one process, its tensors whole) torch's API looks up every entry of
        # the state dict, frozen ones too, as an attribute: bitsandbytes' int8 layers' `SCB` entry is not one
        return {name: parameter.detach().cpu() for name, parameter in parameters.items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    root = _state_root(components, parameters)
    full = get_model_state_dict(root, options=_to_rank_0(ignore_frozen_params=True))
    return {name: full[name] for name in parameters} if full else {}


def full_optimizer_state(
    accelerator: Any, components: Mapping[str, torch.nn.Module], parameters: dict[str, torch.nn.Parameter],
    optimizer: Any, groups: list[list[str]],
) -> dict[str, Any]:
    """The optimizer state whole, in torch's layout (states by parameter index, counted through the
    param groups; ``groups``: the names in each group), as one process saves it; on the main process
    ({} on the others, which take part: a collective when sharded)."""
    if is_deepspeed(accelerator):
        return _deepspeed_full_optimizer_state(parameters, optimizer, groups)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = _torch_optimizer(optimizer)
    if not inner.state:  # no step taken (fp16: every step skipped): nothing to gather, and the API
        return inner.state_dict()  # would create the state with a step of learning rate 0
    root = _state_root(components, parameters)
    full = get_optimizer_state_dict(root, inner, options=_to_rank_0())
    if not full:
        return {}
    named = [list(group["params"]) for group in full["param_groups"]]  # (FQNs: sdtune's names)
    if named != groups:
        raise RuntimeError(f"the optimizer's groups ({[len(g) for g in named]} names) differ from the run's")
    index = {name: position for position, name in enumerate(name for names in groups for name in names)}
    return _relabelled(full, index.__getitem__)


def load_training_state(
    accelerator: Any, components: Mapping[str, torch.nn.Module], parameters: dict[str, torch.nn.Parameter],
    optimizer: Any, trainable: dict[str, torch.Tensor], optimizer_state: dict[str, Any], groups: list[list[str]],
) -> None:
    """Put a checkpoint's whole tensors back: cut into this run's shards, or given to DeepSpeed."""
    check_trainable_names(parameters, trainable)
    if is_deepspeed(accelerator):
        _deepspeed_load_training_state(accelerator, parameters, optimizer, trainable, optimizer_state, groups)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    root = _state_root(components, parameters)
    set_model_state_dict(root, dict(trainable), options=_from_whole())  # (it adds the frozen entries to the dict)
    names = [name for group in groups for name in group]
    named = _relabelled(optimizer_state, names.__getitem__)
    inner = _torch_optimizer(optimizer)
    # strict=False: a trained tensor that never had a gradient (its output unused) has no saved state
    set_optimizer_state_dict(root, inner, named, options=_from_whole(strict=False))
    for name in set(names) - set(named["state"]):  # the API gave every tensor a state (one step at rate
        inner.state.pop(parameters[name], None)  # 0, to learn the shapes): keep torch's "none yet"
    for group, saved in zip(inner.param_groups, optimizer_state["param_groups"]):  # its flattening turned
        group.update({key: value for key, value in saved.items() if key != "params"})  # tuples (betas) into lists


def _relabelled(optimizer_state: dict[str, Any], label: Callable[[Any], Any]) -> dict[str, Any]:
    """The optimizer state with each tensor's key (in ``state`` and in the groups' ``params``) relabelled:
    torch's index (our files) ↔ its name (torch's state-dict API), in the same order."""
    groups = optimizer_state["param_groups"]
    return {
        "state": {label(key): entries for key, entries in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [label(key) for key in group["params"]]} for group in groups],
    }


def full_ema_state(accelerator: Any, parameters: dict[str, torch.nn.Parameter], ema: Any) -> dict[str, Any] | None:
    """The EMA state with whole shadow weights (a collective when sharded). The EMA is neither a module
    nor an optimizer, so torch's state-dict API does not take it: FSDP2's sharded shadows are gathered
    with DTensor's own ``full_tensor``; DeepSpeed's fragments through the fp32 master slot."""
    if ema is None:
        return None
    state = ema.state_dict()
    if is_deepspeed(accelerator):
        state["shadow_params"] = [
            _through_master(parameter, shadow, get=True) for parameter, shadow in zip(parameters.values(), state["shadow_params"])
        ]
    else:
        state["shadow_params"] = [_whole(shadow) for shadow in state["shadow_params"]]
    return state


def shard_ema_state(accelerator: Any, parameters: dict[str, torch.nn.Parameter], saved: dict[str, Any]) -> dict[str, Any]:
    """A saved (whole) EMA state cut like :func:`ema_tensors` of this run (FSDP2: DTensor's own
    ``distribute_tensor``, placed like the parameter each shadow follows)."""
    shadows = saved.get("shadow_params") or []
    if is_deepspeed(accelerator):
        return {**saved, "shadow_params": [_through_master(p, s, get=False) for p, s in zip(parameters.values(), shadows)]}
    return {**saved, "shadow_params": [_placed_like(p, s) for p, s in zip(parameters.values(), shadows)]}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _placed_like(parameter: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(parameter, DTensor):
        return full
    # every process read the same whole tensor from the checkpoint, so no data moves (src_data_rank=None)
    full = full.to(parameter.device, parameter.dtype)
    return distribute_tensor(full, parameter.device_mesh, parameter.placements, src_data_rank=None)


@torch.no_grad()
def _through_master(parameter: torch.nn.Parameter, value: torch.Tensor, get: bool) -> torch.Tensor:
    """A fragment → whole tensor (``get``; a collective), or whole → this process's fragment, by
    passing it through the parameter's fp32 master slot with DeepSpeed's own mapping, then putting
    the master weights back."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    local = _local_fp32(parameter)
    kept = local.clone()
    if get:
        local.copy_(value.to(local.device))
        result = safe_get_full_fp32_param(parameter).clone()
    else:
        safe_set_full_fp32_param(parameter, value.to(local.device, torch.float32))
        result = local.clone()
    local.copy_(kept)
    return result


def _deepspeed_full_optimizer_state(
    parameters: dict[str, torch.nn.Parameter], optimizer: Any, groups: list[list[str]]
) -> dict[str, Any]:
    """Adam's moments whole through ``safe_get_full_optimizer_state``, written in torch's layout."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = _torch_optimizer(optimizer)
    _link_optimizer_state(optimizer)
    step = next(iter(inner.state.values()), {}).get("step", torch.tensor(0.0))
    state, param_groups = {}, []
    for names, group in zip(groups, inner.param_groups):  # (DeepSpeed keeps the groups and their order)
        first = len(state)
        for name in names:
            moments = {key: safe_get_full_optimizer_state(parameters[name], key) for key in ("exp_avg", "exp_avg_sq")}
            state[len(state)] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(), **moments}
        hyper = {key: value for key, value in group.items() if key != "params"}
        param_groups.append({**hyper, "params": list(range(first, len(state)))})
    return {"state": state, "param_groups": param_groups}


def _deepspeed_load_training_state(
    accelerator: Any, parameters: dict[str, torch.nn.Parameter], optimizer: Any, trainable: dict, optimizer_state: dict,
    groups: list[list[str]],
) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _deepspeed_optimizer_state_ready(optimizer)
    for index, name in enumerate(name for names in groups for name in names):  # torch's state layout
        parameter = parameters[name]
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0), torch.no_grad():
            parameter.data.copy_(trainable[name].to(parameter.device, parameter.dtype))  # the weights used
        safe_set_full_fp32_param(parameter, trainable[name].to(accelerator.device))  # the optimizer's master copy
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(parameter, optimizer_state["state"][index][key].to(accelerator.device), key)
    for group, saved in zip(_torch_optimizer(optimizer).param_groups, optimizer_state["param_groups"]):
        group["lr"] = saved["lr"]  # the rate of the step resumed at (the schedule sets it only after a step)
    step = optimizer_state["state"][0]["step"] if optimizer_state["state"] else None
    for entries in _torch_optimizer(optimizer).state.values():
        if step is not None and "step" in entries:
            dtype = entries["step"].dtype if torch.is_tensor(entries["step"]) else None  # (a copy each: torch
            entries["step"] = torch.as_tensor(step, dtype=dtype).clone()  # increments it in place, per group)


def _deepspeed_optimizer_state_ready(optimizer: Any) -> None:
    """Create Adam's state before the first step (torch creates it lazily, in the first step) and
    let DeepSpeed link it to each parameter's fragment, so saved moments can be written into it."""
    inner = _torch_optimizer(optimizer)
    zero = optimizer.optimizer  # accelerate's wrapper → DeepSpeed's ZeRO optimizer
    # ZeRO-3 puts its fp32 partitions into the torch optimizer's groups only while it steps
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or [p for g in inner.param_groups for p in g["params"]]
    for flat in flats:
        if not inner.state[flat]:  # torch's own initial state (AdamW, no amsgrad)
            inner.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
    _link_optimizer_state(optimizer)


def _link_optimizer_state(optimizer: Any) -> None:
    """Link each parameter's fragment to Adam's state (ZeRO-1/2; ZeRO-3 needs no link). DeepSpeed
    links once, right after stepping its *first* param group, so with several groups (a text encoder
    at its own rate) the later groups' fragments stay linked to empty state: link again here."""
    zero = optimizer.optimizer  # accelerate's wrapper → DeepSpeed's ZeRO optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (and DeepSpeed's ZeRO optimizer)."""
    inner = optimizer
    while not type(inner).__module__.startswith("torch.optim") and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner
