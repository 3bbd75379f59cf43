"""The exponential moving average of the trained weights, updated in one pass per tensor.

diffusers' ``EMAModel`` (its decay schedule, ``state_dict``, ``store``/``restore``/``copy_to``),
with one change to ``step``: ``shadow ← shadow + (1 − decay) · (weight − shadow)`` as a single
``lerp_`` per tensor instead of ``shadow.sub_((1 − decay) · (shadow − weight))``, which allocates
and writes two temporaries the size of the model per update. Same maths; on this project's CPU
machines one update of SD 1.5's 860 M UNet weights took 0.39 s instead of 2.77 s
(`benchmarks/levers.py`, the README's benchmarks). On CUDA the lerps go in one multi-tensor (``foreach``) call.

Every tensor handed to ``step`` is averaged: sdtune hands it exactly the trained tensors (under
DeepSpeed its fp32 master fragments, which need not carry ``requires_grad``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel


class LerpEMA(EMAModel):
    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor]) -> None:
        tensors = list(parameters)
        if len(tensors) != len(self.shadow_params):
            raise ValueError(f"EMA holds {len(self.shadow_params)} tensors but was given {len(tensors)}")
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        weight = 1.0 - decay
        if self.foreach:
            torch._foreach_lerp_(self.shadow_params, tensors, weight)
        else:
            for shadow, tensor in zip(self.shadow_params, tensors):
                shadow.lerp_(tensor, weight)
