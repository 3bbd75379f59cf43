"""The LoRA variants that are options of ``kind: lora`` (each a peft feature), as pure helpers.

- rsLoRA (Kalajdzievski 2023, ``use_rslora``): scale alpha/√r instead of alpha/r. Nothing to do here:
  peft computes the scale, the diffusers file keeps ``use_rslora`` in its metadata, and the kohya file's
  per-layer ``alpha`` is written as scale × rank, so that every loader's alpha/rank is alpha/√r.
- PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024), ``init_lora_weights: pissa | pissa_niter_K |
  olora``: A₀, B₀ from the SVD (QR) of each base weight, which peft replaces by the residual
  W − s·B₀A₀. The saved files must load on the *unmodified* base model, so the trained adapter is
  converted as peft's ``subtract_mutated_init`` does: ΔW = s(BA − B₀A₀) = s'·[B | −B₀][A ; A₀], a plain
  LoRA of rank 2r with the same scale s' = s (alpha doubled; with rsLoRA, times √2).
- LoRA+ (Hayou et al. 2024, ``loraplus_lr_ratio``): the B matrices (and, as in peft's
  ``create_loraplus_optimizer``, 1-D adapter tensors such as DoRA's magnitudes) train at
  ``learning_rate × loraplus_lr_ratio``; peft's paper default is 16.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sdtune.config.schema import ConfigError

PLAIN_INITS = (True, False, "gaussian", "orthogonal")  # random or zero B: the base weights stay as they are
MUTATING_INITS = ("pissa", "pissa_niter_K", "olora")  # A₀, B₀ taken out of the base weights


def mutates_base(init: Any) -> bool:
    """True for the initialisations that replace the base weights by a residual (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init == "pissa" or init.startswith("pissa_niter_") or init == "olora")


def check(peft_args: dict[str, Any], loraplus_lr_ratio: float | None, kind: str, init_from: str | None, where: str) -> None:
    """sdtune's checks of LoRA options that peft accepts but sdtune cannot honour."""
    init = peft_args.get("init_lora_weights", True)
    if init not in PLAIN_INITS and not mutates_base(init):
        allowed = ", ".join(str(i).lower() if isinstance(i, bool) else i for i in (*PLAIN_INITS, *MUTATING_INITS))
        raise ConfigError(
            f"{where}.init_lora_weights: {init!r} needs a data or quantisation pass that sdtune does not run; "
            f"choose one of: {allowed}"
        )
    if mutates_base(init):
        if kind != "lora":
            raise ConfigError(
                f"{where}.init_lora_weights: {init!r} with {kind}: the trained {kind} cannot be converted to load on "
                "the unmodified base model; use kind: lora"
            )
        if init_from is not None:
            raise ConfigError(f"{where}: init_from and init_lora_weights: {init!r} both set the start; keep one")
        if peft_args.get("use_rslora") and (peft_args.get("rank_pattern") or peft_args.get("alpha_pattern")):
            raise ConfigError(
                f"{where}: init_lora_weights: {init!r} with use_rslora and rank_pattern/alpha_pattern cannot be "
                "converted to a plain LoRA (peft neither); drop the patterns or use_rslora"
            )
    if loraplus_lr_ratio is not None and not (loraplus_lr_ratio > 0 and math.isfinite(loraplus_lr_ratio)):
        raise ConfigError(
            f"{where}.loraplus_lr_ratio: {loraplus_lr_ratio!r} is not allowed; expected a positive number "
            "(the B matrices' learning rate ÷ learning_rate; LoRA+ recommends 16)"
        )


def check_linear_targets(config: Any, component: torch.nn.Module, what: str) -> None:
    """PiSSA and OLoRA factorise 2-D weights only (peft: "Unknown initialization" on a conv layer)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    for path, module in component.named_modules():
        if path and check_target_module_exists(config, path) and not isinstance(module, torch.nn.Linear):
            raise ConfigError(
                f"init_lora_weights: {config.init_lora_weights!r} works on linear layers only, and target_modules "
                f"match the {type(module).__name__} {path} of the {what}; target linear layers or use init_lora_weights: true"
            )


def loraplus_groups(parameters: dict[str, torch.nn.Parameter], learning_rate: float, ratio: float) -> list[dict[str, Any]]:
    """LoRA+ parameter groups: A matrices at ``learning_rate``, B matrices (and 1-D tensors) × ``ratio``."""
    fast = {name for name, p in parameters.items() if "lora_B" in name or "lora_embedding_B" in name or p.ndim == 1}
    groups = [
        {"params": [p for n, p in parameters.items() if n not in fast], "lr": learning_rate},
        {"params": [p for n, p in parameters.items() if n in fast], "lr": learning_rate * ratio},
    ]
    return [group for group in groups if group["params"]]


def subtract_initial(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PiSSA/OLoRA adapter's peft state as a plain LoRA of twice the rank on the original base:
    A' = [A ; A₀], B' = [B | −B₀] (peft ``LoraModel.subtract_mutated_init``)."""
    converted = {}
    for key, value in state.items():
        if "lora_A" in key:
            converted[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif "lora_B" in key:
            converted[key] = torch.cat([value, -initial[key].to(value)], dim=1)
        else:
            raise ValueError(f"{key}: not a LoRA factor; a mutated initialisation has only lora_A/lora_B")
    return converted


def converted_config_args(peft_args: dict[str, Any]) -> dict[str, Any]:
    """The peft arguments of the converted adapter: rank 2r, the same scale, a plain initialisation
    (loading must not run PiSSA/OLoRA on the base again)."""
    args = dict(peft_args, init_lora_weights=True, r=2 * peft_args["r"])
    args["lora_alpha"] = peft_args["lora_alpha"] * (math.sqrt(2) if peft_args.get("use_rslora") else 2)
    for pattern in ("rank_pattern", "alpha_pattern"):
        if args.get(pattern):
            args[pattern] = {key: 2 * value for key, value in args[pattern].items()}
    return args
