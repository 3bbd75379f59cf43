"""Counting the bytes of the tensors a computation holds, without holding them: run it on the meta
device (shapes and dtypes, no data) under :class:`LiveBytes`, which adds each new storage's size
when an operator creates it and takes it off when the storage is freed, and keeps the peak.

What this measures is what the operators allocate, as the real run would, in order: the
activations autograd saves, the temporaries of each operator, the gradients as backward produces
them. It does not see what a device allocator adds on top (CUDA's caching allocator rounds blocks
up and keeps freed ones, cuDNN and cuBLAS take workspaces, memory fragments), nor the process
itself (on a CPU: the interpreter and its libraries). docs/memory.md says how far to trust it.

Attention: on the meta device ``scaled_dot_product_attention`` always decomposes into the math
path, which materialises the (tokens × tokens) score matrix per head; the real run on a GPU or a
recent CPU uses a fused kernel that keeps only the output and one log-sum-exp per row.
:func:`fused_attention` routes the call to that fused kernel's operator (whose meta function and
backward formula torch ships) so the count matches what the real run keeps.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode and still alive (``live``), their ``peak``, and
    the bytes of every storage created (``allocated``: what a malloc is asked for over the block)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocated = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the storage's own address: views of one storage count once
        if key in self._alive:
            return
        size = storage.nbytes()
        self._alive.add(key)
        self.live += size
        self.allocated += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        if key in self._alive:
            self._alive.discard(key)
            self.live -= size

    def reset_peak(self) -> None:
        self.peak = self.live


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Meta-device ``scaled_dot_product_attention`` without a mask → the fused (flash) kernel's
    operator, which saves the output and a log-sum-exp per row for backward instead of the score
    matrix. The function is swapped on ``torch.nn.functional`` for the block (diffusers' and
    transformers' attention look it up there at each call), not with a TorchFunctionMode: a mode is
    not active when gradient checkpointing recomputes a forward inside the backward pass."""
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, **options: Any) -> Any:
        if query.device.type != "meta" or attn_mask is not None or options.get("enable_gqa"):
            return original(query, key, value, attn_mask=attn_mask, **options)
        kept = {k: v for k, v in options.items() if k in ("dropout_p", "is_causal", "scale")}
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, **kept)[0]

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
