"""The optimizer (AdamW: torch's fused kernel, or bitsandbytes' 8-bit and paged ones; optionally
offloaded to the CPU, or stepped inside the backward pass), the learning-rate schedule (diffusers')
and the EMA of the trained weights, built from the run's settings. The memory each choice saves:
docs/memory.md."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import torch

from sdtune.config import TrainConfig
from sdtune.techniques import Technique
from sdtune.training.ema import LerpEMA


def has_fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for this device (CUDA; the CPU since torch 2.4)."""
    if device.type == "cuda":
        return True
    release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return device.type == "cpu" and release >= (2, 4)


def parameter_groups(
    technique: Technique, parameters: dict[str, torch.nn.Parameter], denoiser: str, learning_rate: float
) -> list[dict[str, Any]]:
    """The denoiser's tensors at ``learning_rate`` and the text encoders' at the technique's text-encoder
    rate (or the same), each split further as the technique says (LoRA+). The order is fixed, so a
    resumed run restores each group's state into the same group."""
    text_lr = technique.options.text_encoder_learning_rate or learning_rate
    prefix = denoiser + "."
    return [
        *technique.parameter_groups({n: p for n, p in parameters.items() if n.startswith(prefix)}, learning_rate),
        *technique.parameter_groups({n: p for n, p in parameters.items() if not n.startswith(prefix)}, text_lr),
    ]


def optimizer_class(kind: str) -> type[torch.optim.Optimizer]:
    """The AdamW of ``train.optimizer``: torch's, or bitsandbytes' 8-bit (moments as 8-bit blockwise
    codes, 2 bytes per weight instead of 8) and paged ones (moments in CUDA unified memory, which
    the driver pages out to the CPU when the GPU runs short) (the config check made sure
    bitsandbytes imports)."""
    if kind == "adamw":
        return torch.optim.AdamW
    import bitsandbytes

    return {
        "adamw8bit": bitsandbytes.optim.AdamW8bit, "paged_adamw": bitsandbytes.optim.PagedAdamW,
        "paged_adamw8bit": bitsandbytes.optim.PagedAdamW8bit,
    }[kind]


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``groups`` with the train section's betas, weight decay and epsilon;
    offloaded to the CPU with ``optimizer_offload``, stepped in the backward pass with ``fused_backward``."""
    kind = optimizer_class(config.optimizer)
    hyper = {"betas": (config.adam_beta1, config.adam_beta2), "weight_decay": config.adam_weight_decay, "eps": config.adam_epsilon}
    if config.optimizer_offload:
        from torchao.optim import CPUOffloadOptimizer

        # the moments and an fp32 copy of each trained tensor on the CPU; each gradient is copied
        # there as soon as it is complete, and the step runs there (torch's fused CPU AdamW); the
        # GPU gradient is freed after the copy when there is nothing to accumulate into
        return CPUOffloadOptimizer(
            groups, optimizer_class=kind, offload_gradients=config.gradient_accumulation_steps == 1, **hyper
        )
    kernel = {}
    if kind is torch.optim.AdamW and has_fused_adamw(device):
        # one pass over each tensor (torch's default on the CPU is a per-tensor loop of ~10 ops: on SD
        # 1.5's 860 M UNet weights 3.76 s per step instead of 0.77 s on this project's CPU machines)
        kernel = {"fused": True}
    optimizer = kind(groups, **hyper, **kernel)
    if config.fused_backward:
        step_in_backward(optimizer)
    return optimizer


def step_in_backward(optimizer: torch.optim.Optimizer) -> None:
    """Step each trained tensor as soon as its gradient is complete, then free that gradient, so the
    gradients are never all held at once (PyTorch's recipe "How to save memory by fusing the
    optimizer step into the backward pass": ``register_post_accumulate_grad_hook``).

    The one optimizer keeps its state, param groups and LR schedule (checkpoints are the same as
    without the saver); each hook steps it over that one tensor. A tensor's gradient being final
    when its hook fires is why the config refuses accumulation (the step would come after the
    first micro-batch), global-norm clipping (the norm needs every gradient) and fp16 (the loss
    scale would have to come off every gradient first). The loop then skips its own clip and step."""
    for index, group in enumerate(optimizer.param_groups):
        for parameter in group["params"]:
            parameter.register_post_accumulate_grad_hook(partial(_step_one, optimizer, index))


@torch.no_grad()
def _step_one(optimizer: torch.optim.Optimizer, owner: int, parameter: torch.Tensor) -> None:
    # the groups are cut down to this tensor for the call (the step skips tensors without gradients
    # anyway, but would look at every one of them: O(tensors²) a step instead of O(tensors)); by
    # index: load_state_dict (accelerate's prepare, a resume) replaces the group dicts, in order
    kept = [group["params"] for group in optimizer.param_groups]
    for index, group in enumerate(optimizer.param_groups):
        group["params"] = [parameter] if index == owner else []
    try:
        optimizer.step()
    finally:
        for group, params in zip(optimizer.param_groups, kept):
            group["params"] = params
    parameter.grad = None


def step_scheduler(scheduler: Any, fused_backward: bool) -> None:
    """Advance the learning-rate schedule after the step. With ``fused_backward`` the tensors were
    stepped in the backward pass through the optimizer itself (:func:`step_in_backward`), not through
    the wrapper torch's scheduler watches, so its warning that the schedule was stepped before the
    optimizer (and would skip its first rate) is not so here, and is not shown."""
    if not fused_backward:
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        scheduler.step()


def clip_gradients(accelerator: Any, optimizer: Any, parameters: list[torch.nn.Parameter], max_norm: float | None) -> None:
    """Clip the global gradient norm to ``max_norm`` (None: no clipping). With the optimizer offloaded
    the gradients it steps with are its CPU copies (taken as each gradient completed), so those are
    clipped, together with the small tensors it keeps on the GPU."""
    if max_norm is None:
        return
    offloaded = getattr(_unwrapped_optimizer(optimizer), "param_d2h_map", None)  # torchao's CPUOffloadOptimizer
    if not offloaded:
        accelerator.clip_grad_norm_(parameters, max_norm)
        return
    inner = _unwrapped_optimizer(optimizer)
    for event in inner.queue.values():  # the copies to the CPU have landed
        event.synchronize()
    kept_on_device = [p for group in inner.d_param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_([*offloaded.values(), *kept_on_device], max_norm)


def sync_offloaded(optimizer: Any) -> None:
    """After trained tensors were set from a checkpoint: the offloaded optimizer's CPU copies of them
    (which its steps update and copy back) take the restored values."""
    for on_device, on_cpu in (getattr(_unwrapped_optimizer(optimizer), "param_d2h_map", None) or {}).items():
        on_cpu.copy_(on_device.detach())


def _unwrapped_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def build_lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, max_steps: int) -> Any:
    """diffusers' schedule, stepped once per optimizer step by the loop itself (not prepared by
    accelerate, so it is not scaled by the number of processes)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=max_steps
    )


def build_ema(tensors: list[torch.Tensor], config: TrainConfig, device: torch.device) -> LerpEMA | None:
    """The EMA of ``tensors`` (one lerp per tensor; multi-tensor on CUDA only: on the CPU it is no
    faster), or None without ``use_ema``."""
    if not config.use_ema:
        return None
    ema = LerpEMA(tensors, decay=config.ema_decay, foreach=device.type == "cuda")
    ema.to(device)
    return ema
