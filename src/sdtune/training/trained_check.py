"""Did the technique train what it claims? A check on every run, recorded as ``checks.trained``.

Three kinds of evidence, gathered cheaply:

- **gradients** (:class:`GradientWitness`): after each optimizer step's backward passes, every trainable
  tensor whose flag is still unset is asked whether its gradient has a non-zero element
  (``grad.any()``, per row for the tensors a technique names: textual inversion's vectors); a set flag
  is never looked at again, so once every flag is set the loop does nothing more per step
  (``gradient_watch_steps`` in the record counts the steps it did). On CUDA the answers stay on the
  device until the loop's own sync points (no extra host sync); on the CPU they are read at once.
  Tensors the family says no loss reaches (:meth:`sdtune.models.Model.unreachable_parameters`) are
  not watched, and named in the record. Under DeepSpeed the gradients live inside its engine and are
  not observed (``gradient_watch_steps: null``), nor with the memory savers that free each gradient
  inside the backward pass (``fused_backward``; ``optimizer_offload`` without accumulation): the
  digests (a trainable tensor moved) remain.
- **digests** (:func:`digests`): a BLAKE2b fingerprint of every trainable and every frozen tensor,
  taken after the technique prepared the model and again after training: a trainable tensor must have
  moved, a frozen one must not. Whole tensors while the model holds at most 2²⁸ elements in all
  (1 GiB in float32: the demo and the test models); on bigger models, a fixed sample of every tensor:
  the elements at positions 0, s, 2s, … with s = ⌈n / 65,536⌉ (the same positions before and after;
  every tensor stays covered, at most 65,536 elements each). Sharded runs (FSDP2/DeepSpeed) shard the
  trained components' frozen tensors too: their frozen check covers the components that do not train.
- **the technique's own claims**: :meth:`sdtune.techniques.Technique.trained_invariants` (adapted
  layers' merged ΔW non-zero, DoRA's magnitudes moved, every textual-inversion vector moved, partial
  trained exactly its chosen tensors, the claimed components changed and no other), and the loop's
  EMA: the EMA weights differ from the raw ones (whenever its decay was above 0).

At resume the frozen tensors' digests are compared with those the run started with (saved in each
checkpoint): a base model that changed between sessions is a failed item.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict
from fnmatch import fnmatchcase
from typing import Any

import torch

from sdtune.models import Model
from sdtune.records import CheckFailure, TrainedCheck
from sdtune.techniques import Technique, TrainedEvidence, trainable_named_parameters

WHOLE_BUDGET = 2**28  # elements digested whole, over all tensors (1 GiB of float32)
SAMPLE = 65_536  # elements of each tensor digested beyond the budget


def digest(tensor: torch.Tensor, sampled: bool) -> str:
    """BLAKE2b (16 bytes) of a tensor's values, or of a fixed strided sample of them."""
    flat = tensor.detach().reshape(-1)
    if sampled and flat.numel() > SAMPLE:
        flat = flat[:: math.ceil(flat.numel() / SAMPLE)]
    values = flat.contiguous().cpu()
    if values.dtype == torch.bfloat16:  # (numpy has no bfloat16: its bits as int16)
        values = values.view(torch.int16)
    return hashlib.blake2b(values.numpy(), digest_size=16).hexdigest()


def _per_row(name: str, technique: Technique) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in technique.per_row_parameters())


def frozen_named_parameters(model: Model, components: list[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """Every parameter without requires_grad, named ``<component>.<parameter>`` (the VAE included)."""
    return {
        f"{component}.{name}": parameter
        for component, module in model.components.items() if components is None or component in components
        for name, parameter in module.named_parameters() if not parameter.requires_grad
    }


def digests(model: Model, technique: Technique, frozen_components: list[str] | None = None) -> dict[str, Any]:
    """The digests of the trainable tensors (per row where the technique says) and of the frozen ones
    (of ``frozen_components`` only, when given: sharded runs)."""
    trained = trainable_named_parameters(model)
    frozen = frozen_named_parameters(model, frozen_components)
    sampled = sum(p.numel() for p in [*trained.values(), *frozen.values()]) > WHOLE_BUDGET
    return {
        "trained": {
            name: [digest(row, sampled) for row in p] if _per_row(name, technique) else digest(p, sampled)
            for name, p in trained.items()
        },
        "frozen": {name: digest(p, sampled) for name, p in frozen.items()},
        "mode": f"sampled (every ⌈n/{SAMPLE}⌉-th element of each tensor)" if sampled else "whole tensors",
        "frozen_components": frozen_components,
    }


def new_evidence(start: dict[str, Any]) -> dict[str, Any]:
    """The evidence a run's :class:`~sdtune.training.state.TrainState` carries from its start."""
    return {"start": start, "gradients": {}, "watch_steps": 0, "resume_failures": []}


def gradients_observable(config: Any, deepspeed: bool) -> bool:
    """Whether the loop sees the gradients after the backward passes: not under DeepSpeed (its engine
    holds them), ``fused_backward`` (each gradient is freed in the backward pass once its tensor has
    stepped) or ``optimizer_offload`` without accumulation (each is freed once copied to the CPU)."""
    offloaded = config.optimizer_offload and config.gradient_accumulation_steps == 1
    return not (deepspeed or config.fused_backward or offloaded)


def _local(gradient: torch.Tensor) -> torch.Tensor:
    return gradient.to_local() if hasattr(gradient, "to_local") else gradient  # FSDP2: this process's shard


class GradientWitness:
    """Flags, per trainable tensor (or row), whether it got a non-zero gradient at least once."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], evidence: dict[str, Any], technique: Technique,
                 unreachable: list[str], device: torch.device, observable: bool = True) -> None:
        self.evidence, self.observable, self.on_cpu = evidence, observable, device.type == "cpu"
        # every tensor's flag layout: its rows (per-row tensors; not under FSDP2, which shards rows) or None
        self.layout = [
            (name, p.shape[0] if _per_row(name, technique) and not hasattr(p, "to_local") else None)
            for name, p in sorted(parameters.items())
        ]
        rows = dict(self.layout)
        seen = evidence["gradients"]
        self.pending = [
            (name, p, rows[name] is not None) for name, p in parameters.items()
            if observable and not _all_set(seen.get(name)) and not any(fnmatchcase(name, u) for u in unreachable)
        ]
        self.flags: dict[str, torch.Tensor] = {}

    def observe(self) -> None:
        """After the step's backward passes (before the gradients are cleared)."""
        if not self.pending:
            return
        self.evidence["watch_steps"] += 1
        for name, parameter, per_row in self.pending:
            if parameter.grad is None:
                continue
            gradient = _local(parameter.grad)
            flag = gradient.reshape(gradient.shape[0], -1).any(dim=1) if per_row else gradient.any()
            self.flags[name] = flag if name not in self.flags else self.flags[name] | flag
        if self.on_cpu:
            self.collect()

    def collect(self) -> None:
        """Read the flags back (a sync point on CUDA) and stop watching the tensors fully set."""
        seen = self.evidence["gradients"]
        for name, flag in self.flags.items():
            value = flag.tolist()
            previous = seen.get(name)
            if isinstance(value, list):
                seen[name] = [bool(a) or bool(b) for a, b in zip(value, previous or [False] * len(value))]
            else:
                seen[name] = bool(value) or bool(previous)
        self.flags = {}
        self.pending = [entry for entry in self.pending if not _all_set(seen.get(entry[0]))]

    def merged(self, accelerator: Any) -> dict[str, Any] | None:
        """The flags of every process (any process's non-zero shard counts); None when not observable."""
        self.collect()
        if not self.observable:
            return None
        seen = self.evidence["gradients"]
        if accelerator.num_processes == 1:
            return dict(seen)
        flat = []
        for name, rows in self.layout:  # the same layout on every process
            value = seen.get(name)
            flat += [float(bool(v)) for v in (value or [False] * rows)] if rows is not None else [float(bool(value))]
        total = accelerator.reduce(torch.tensor(flat, device=accelerator.device), reduction="sum").tolist()
        merged, at = {}, 0
        for name, rows in self.layout:
            width = rows if rows is not None else 1
            values = [v > 0 for v in total[at: at + width]]
            merged[name] = values if rows is not None else values[0]
            at += width
        return merged


def _all_set(value: Any) -> bool:
    return bool(value) and (all(value) if isinstance(value, list) else True)


def resume_failures(session_start: dict[str, Any], run_start: dict[str, Any]) -> list[dict[str, str]]:
    """Frozen tensors whose digest differs from the run's first session (a base model that changed)."""
    saved = run_start.get("frozen", {})
    return [
        asdict(CheckFailure("resume", name, "differs from the run's start: the base model changed between sessions"))
        for name, value in session_start.get("frozen", {}).items() if name in saved and saved[name] != value
    ]


def evidence_of(model: Model, technique: Technique, evidence: dict[str, Any], gradients: dict[str, Any] | None,
                layer_changes: dict[str, float], frozen_scope: list[str] | None = None
                ) -> tuple[TrainedEvidence, list[CheckFailure], int]:
    """The technique's evidence from the trained ``model``, the generic failures (gradients, moves,
    frozen tensors: of the ``frozen_scope`` components when given) and how many frozen tensors were
    compared."""
    start, unreachable = evidence["start"], tuple(model.unreachable_parameters())
    sampled = start["mode"].startswith("sampled")
    moved, rows = {}, {}
    for name, parameter in trainable_named_parameters(model).items():
        begin = start["trained"].get(name)
        if isinstance(begin, list):
            row_moved = [digest(row, sampled) != b for row, b in zip(parameter, begin)]
            flags = None if gradients is None else gradients.get(name)
            row_flags = flags if isinstance(flags, list) else [None if gradients is None else bool(flags)] * len(row_moved)
            rows[name] = tuple(zip(row_flags, row_moved))
            moved[name] = any(row_moved)
        else:
            moved[name] = begin is None or digest(parameter, sampled) != begin
    seen = TrainedEvidence(
        trained=frozenset(moved), gradient=None if gradients is None else {n: _any(gradients.get(n)) for n in moved},
        moved=moved, rows=rows, layer_changes=layer_changes, unreachable=unreachable,
    )
    failures = []
    for name in sorted(moved):
        if not seen.reachable(name):
            continue
        if seen.gradient is not None and not seen.gradient[name]:
            failures.append(CheckFailure("gradient", name, "never got a non-zero gradient"))
        if not moved[name]:
            failures.append(CheckFailure("moved", name, "did not move from its start"))
    frozen = frozen_named_parameters(model, frozen_scope if frozen_scope is not None else start.get("frozen_components"))
    # (a tensor with no values has nothing to compare: only the savers' tests park freed encoders on
    # the meta device; a real run parks them on the CPU, where they are digested like the rest)
    frozen = {name: parameter for name, parameter in frozen.items() if not parameter.is_meta}
    failures += [
        CheckFailure("frozen", name, "a frozen tensor changed during training")
        for name, parameter in frozen.items()
        if name in start["frozen"] and digest(parameter, sampled) != start["frozen"][name]
    ]
    return seen, failures, len(frozen)


def _any(value: Any) -> bool:
    return any(value) if isinstance(value, list) else bool(value)


def check_trained(
    model: Model, technique: Technique, evidence: dict[str, Any], gradients: dict[str, Any] | None,
    layer_changes: dict[str, float], ema: tuple[bool, float] | None, frozen_scope: list[str] | None = None,
) -> TrainedCheck:
    """The run's ``checks.trained``: ``ema`` is (EMA weights differ from the raw ones, last decay) when
    the run kept an EMA; ``frozen_scope`` the components whose frozen tensors are compared (sharded
    runs: those that do not train; default: as at the start)."""
    started = time.perf_counter()
    seen, failures, frozen_count = evidence_of(model, technique, evidence, gradients, layer_changes, frozen_scope)
    failures += technique.trained_invariants(model, seen)
    if ema is not None and ema[1] > 0 and not ema[0]:
        failures.append(CheckFailure("ema", "ema", f"the EMA weights equal the raw weights (last decay {ema[1]:.4g})"))
    at_resume = list(evidence.get("resume_failures", []))
    changed_before = {f["where"] for f in at_resume}  # (a tensor that differed at a resume: reported as such)
    failures = [asdict(f) for f in failures if not (f.item == "frozen" and f.where in changed_before)] + at_resume
    unreachable = sorted(name for name in seen.trained if not seen.reachable(name))
    return TrainedCheck(
        passed=not failures, failures=failures,
        checked={
            "trained_tensors": len(seen.trained), "frozen_tensors": frozen_count,
            "gradients_seen": sum(seen.gradient.values()) if seen.gradient is not None else 0,
            "moved": sum(seen.moved.values()), "adapted_layers": len(layer_changes),
            "rows": sum(len(r) for r in seen.rows.values()),
        },
        unreachable=unreachable, gradient_watch_steps=evidence["watch_steps"] if gradients is not None else None,
        digests=evidence["start"]["mode"] + ("" if (frozen_scope or evidence["start"].get("frozen_components")) is None
                                              else "; frozen: the components that do not train (sharded run)"),
        time_s=time.perf_counter() - started,
    )
