"""``train.block_swap``: the frozen weights of a large transformer's last N blocks wait on the CPU
and come to the GPU only while their block computes (forward, and backward), one block at a time.

For SD 3.5 Large (8.1 B parameters, 38 joint blocks of ~210 M each: 16 GB of bf16 weights) with an
adapter, this is what lets the frozen base fit beside the activations on a 24 GB card (the estimate
in docs/memory.md). Only frozen tensors move: the trained ones (an adapter's, or a partial
technique's) stay on the GPU, so the optimizer never sees a tensor change device.

How a block is brought in for its backward: the block's forward hooks put two identity autograd
functions around it — :class:`_LeaveAfterBackward` on its tensor inputs, :class:`_ArriveForBackward`
on its tensor outputs. Backward runs them in reverse: the one on the outputs runs before any of the
block's own backward nodes (each of them needs those outputs' gradients), and brings the block in;
the one on the inputs runs once every gradient into the block's inputs is computed, and parks it
again. A zero-size tensor that requires grad is fed to both, so their backward runs even when no
input of the block requires grad (the first block of an adapter-trained model). With gradient
checkpointing the block's forward runs again inside its backward; the block is already in and
stays in until its backward is over.

The moves are synchronous copies from pinned memory (no prefetch of the next block on a side
stream): simple and exact, at the cost of the transfer time of the swapped weights twice a step.
"""

from __future__ import annotations

from typing import Any

import torch

from sdtune.config import ConfigError


class BlockSwap:
    """The swapped blocks of one denoiser, their frozen tensors' CPU masters, and the hooks."""

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, parking: torch.device, dtype: torch.dtype):
        self.device, self.parking = device, parking
        self.frozen: list[list[torch.nn.Parameter]] = []
        self.masters: list[list[torch.Tensor]] = []
        for block in blocks:
            parameters = [p for p in block.parameters() if not p.requires_grad]
            pin = device.type == "cuda"  # (pinned host memory: the copies to the GPU run at full speed)
            self.frozen.append(parameters)
            self.masters.append([p.data.to("cpu", dtype).pin_memory() if pin else p.data.to("cpu", dtype) for p in parameters])
        self.in_backward = [False] * len(blocks)
        self.arrivals = 0  # blocks brought in (forward and backward), for the record and the tests
        self.most_in = 0  # the most swapped blocks on the device at once
        self._in: set[int] = set()
        self.token = torch.zeros((), device=device, requires_grad=True)  # makes the markers' backward run
        for index, block in enumerate(blocks):
            self.leave(index)
            block.register_forward_pre_hook(self._before_forward(index), with_kwargs=True)
            block.register_forward_hook(self._after_forward(index), with_kwargs=True)

    @property
    def parameter_ids(self) -> set[int]:
        """The swapped tensors (setup places every other tensor on the device)."""
        return {id(p) for parameters in self.frozen for p in parameters}

    @property
    def swapped_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for masters in self.masters for m in masters)

    def arrive(self, index: int) -> None:
        if index in self._in:
            return
        for parameter, master in zip(self.frozen[index], self.masters[index]):
            parameter.data = master if master.device == self.device else master.to(self.device, non_blocking=True)
        self._in.add(index)
        self.arrivals += 1
        self.most_in = max(self.most_in, len(self._in))

    def leave(self, index: int) -> None:
        for parameter, master in zip(self.frozen[index], self.masters[index]):
            # the CPU master itself (nothing to copy back: frozen weights do not change); on the tests'
            # fake split (parking "meta") a zero-size tensor, which no layer can compute with
            parameter.data = master if master.device == self.parking else master.new_empty(0)
        self._in.discard(index)

    def home(self) -> None:
        """Training is over: every swapped tensor holds its CPU master again (real values, on the
        tests' fake split too), for what reads the finished model's weights (the anatomy)."""
        for index, (parameters, masters) in enumerate(zip(self.frozen, self.masters)):
            for parameter, master in zip(parameters, masters):
                parameter.data = master
            self._in.discard(index)

    def _before_forward(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self.arrive(index)
            if not torch.is_grad_enabled():
                return args, kwargs
            return _through(_LeaveAfterBackward, self, index, args, kwargs)

        return hook

    def _after_forward(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.in_backward[index]:  # (a checkpointed block recomputed in its backward stays in)
                self.leave(index)
            if not torch.is_grad_enabled():
                return output
            outputs, _ = _through(_ArriveForBackward, self, index, output if isinstance(output, tuple) else (output,), {})
            return outputs if isinstance(output, tuple) else outputs[0]

        return hook


def _through(function: type, swap: BlockSwap, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with their floating-point tensors passed through ``function`` (one call)."""
    slots = [("a", i) for i, v in enumerate(args) if _is_float(v)] + [("k", k) for k, v in kwargs.items() if _is_float(v)]
    passed = function.apply(swap, index, swap.token, *[args[key] if kind == "a" else kwargs[key] for kind, key in slots])
    args, kwargs = list(args), dict(kwargs)
    for (kind, key), tensor in zip(slots, passed):
        if kind == "a":
            args[key] = tensor
        else:
            kwargs[key] = tensor
    return tuple(args), kwargs


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


class _Marker(torch.autograd.Function):
    """Identity on a block's tensors; what its backward does to the block is the subclass's."""

    @staticmethod
    def forward(ctx: Any, swap: BlockSwap, index: int, token: torch.Tensor, *tensors: torch.Tensor) -> tuple:
        ctx.swap, ctx.index = swap, index
        return tuple(t.view_as(t) for t in tensors)


class _ArriveForBackward(_Marker):
    """On a block's outputs: its backward brings the block in before the block's own."""

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        ctx.swap.in_backward[ctx.index] = True
        ctx.swap.arrive(ctx.index)
        return (None, None, None, *grads)


class _LeaveAfterBackward(_Marker):
    """On a block's inputs: its backward parks the block once the block's own is done."""

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        ctx.swap.in_backward[ctx.index] = False
        ctx.swap.leave(ctx.index)
        return (None, None, None, *grads)


def attach(
    denoiser: torch.nn.Module, blocks_attribute: str | None, count: int, family: str, device: torch.device,
    parking: torch.device, dtype: torch.dtype,
) -> BlockSwap | None:
    """Swap the last ``count`` blocks of ``denoiser.<blocks_attribute>`` (None when ``count`` is 0)."""
    if count == 0:
        return None
    if blocks_attribute is None:
        raise ConfigError(
            f"train.block_swap: {family}'s denoiser is a UNet with no list of transformer blocks to swap "
            "(block swap is for large transformers: sd3); set it to 0"
        )
    blocks = list(getattr(denoiser, blocks_attribute))
    if count >= len(blocks):
        raise ConfigError(f"train.block_swap: {count} is not allowed; expected 1 to {len(blocks) - 1} of the {len(blocks)} blocks")
    chosen = blocks[-count:]
    if not any(not p.requires_grad for block in chosen for p in block.parameters()):
        raise ConfigError(
            "train.block_swap: the technique trains every weight of the swapped blocks (nothing frozen stays on "
            "the CPU); use it with an adapter, or set it to 0"
        )
    return BlockSwap(chosen, device, parking, dtype)
