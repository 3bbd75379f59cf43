"""Quantised frozen components (QLoRA): a loaded component's linear layers as bitsandbytes layers.

``nf4`` is QLoRA's storage (Dettmers et al. 2023): 4-bit NormalFloat in blocks of 64 weights with
double-quantised scales, computed in the training dtype. ``int8`` is LLM.int8() (Dettmers et al.
2022): a per-row absmax int8 weight, outliers of the input above 6.0 in 16-bit on CUDA. Only
``torch.nn.Linear`` layers are quantised (bitsandbytes has no convolution); convolutions, norms and
embeddings stay at the load dtype, and the record says what share of the weights that leaves.

Why sdtune swaps the layers itself rather than passing diffusers' ``quantization_config`` to
``from_pretrained``: diffusers' bitsandbytes quantizer refuses to run without a GPU ("No GPU
found. A GPU is needed for quantization", diffusers 0.42 and main), and sdtune's CPU tests must
exercise the same path as a GPU run. The layers are built the way bitsandbytes documents and
diffusers' quantizer does (``Linear4bit``/``Linear8bitLt`` holding ``Params4bit``/``Int8Params``,
quantised when moved to their device), from the settings of the ecosystem's own
``BitsAndBytesConfig`` (diffusers' for the denoiser, transformers' for text encoders), and the
component is marked ``is_loaded_in_4bit``/``is_loaded_in_8bit`` as those quantizers mark it, which
is what makes peft put its bitsandbytes LoRA/DoRA layers on it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sdtune.config import QUANTIZATION_INSTALL
from sdtune.errors import UserError

QUANTIZED_PARAMETER_TYPES = ("Params4bit", "Int8Params")  # bitsandbytes' quantised parameter classes
LOADED_FLAGS = {"nf4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}  # what peft and diffusers read
MARK = "sdtune_quantization"  # set on a quantised component: its type (nf4 | int8)


class QuantizationUnavailable(UserError, ImportError):
    """Quantisation was asked for without its backend installed."""


def bitsandbytes() -> Any:
    """The bitsandbytes module, or one line naming the install command."""
    # its CPU backend tries to fetch a kernel from the hub at import (through `kernels`) and logs the
    # refusal; the portable fallback it uses instead is the one sdtune's CPU numbers are measured
    # with. LLM.int8() quantises fp32 inputs through fp16 by design, and logs so on every call.
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantizationUnavailable(f"quantised components need bitsandbytes; {QUANTIZATION_INSTALL}") from None
    return bnb


def bnb_config(kind: str, compute_dtype: torch.dtype, library: str = "diffusers") -> Any:
    """The ecosystem's ``BitsAndBytesConfig`` for ``kind`` (diffusers' or transformers' class): NF4
    with double quantisation and ``compute_dtype`` (QLoRA's recipe), or LLM.int8() with its 6.0
    outlier threshold."""
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"not a quantisation type: {kind!r}")


def quantize_component(
    module: torch.nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device, library: str = "diffusers"
) -> None:
    """Replace every ``torch.nn.Linear`` of ``module`` (but those the model keeps in fp32) by a frozen
    bitsandbytes layer of ``kind``, quantised on ``device``; mark the module as quantised."""
    bnb = bitsandbytes()
    config = bnb_config(kind, compute_dtype, library)
    kept = set(config.llm_int8_skip_modules or []) | set(getattr(module, "_keep_in_fp32_modules", None) or [])
    for name, child in list(module.named_modules()):
        if type(child) is not torch.nn.Linear or any(part in kept for part in name.split(".")):
            continue
        layer = _quantized_linear(bnb, child, kind, config).to(device)  # bitsandbytes quantises on the move
        layer.train(child.training)
        _replace(module, name, layer)
    setattr(module, LOADED_FLAGS[kind], True)
    setattr(module, MARK, kind)


def _quantized_linear(bnb: Any, linear: torch.nn.Linear, kind: str, config: Any) -> torch.nn.Module:
    weight = linear.weight.detach().to("cpu")
    has_bias = linear.bias is not None
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type, module=layer,
        )
        # bitsandbytes' CPU inference path repacks the weight for bf16 kernels in place on the first
        # call in eval mode: it fails on layers narrower than a block (64 inputs) and changes the
        # stored weight; off, a CPU layer computes the same way in training and in sampling
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
            threshold=config.llm_int8_threshold, device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    return layer


def _replace(module: torch.nn.Module, name: str, layer: torch.nn.Module) -> None:
    """Put ``layer`` at ``name`` in ``module`` (``get_submodule("")`` is the module itself)."""
    owner, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(owner), attribute, layer)


def quantization_of(module: torch.nn.Module) -> str | None:
    """The quantisation type sdtune loaded ``module`` with (nf4 | int8), or None."""
    return getattr(module, MARK, None)


def is_quantized_parameter(parameter: torch.Tensor) -> bool:
    """A bitsandbytes-quantised weight: packed storage that must not be cast to another dtype."""
    return type(parameter).__name__ in QUANTIZED_PARAMETER_TYPES


def logical_numel(parameter: torch.Tensor) -> int:
    """The number of weights a parameter stands for (a packed NF4 tensor holds two per byte)."""
    state = getattr(parameter, "quant_state", None)
    return int(state.shape.numel()) if state is not None else parameter.numel()


def quantized_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every bitsandbytes layer of ``module`` by name (under peft's wrappers too)."""
    return {
        name: child for name, child in module.named_modules()
        if is_quantized_parameter(getattr(child, "weight", None)) and not hasattr(child, "base_layer")
    }


def quantized_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen quantised weights of ``module`` as bitsandbytes serialises them (packed data and
    every quantisation statistic), copied and named as in the base model (peft's ``base_layer``
    level left out): what a trained-what-it-claims check compares."""
    state = {}
    for name, layer in quantized_layers(module).items():
        name = name.replace(".base_layer", "")
        for key, value in layer.state_dict().items():
            if isinstance(value, torch.Tensor):
                state[f"{name}.{key}"] = value.detach().to("cpu", copy=True)
    return state


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers occupy, quantisation statistics included."""
    total = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    for layer in quantized_layers(module).values():
        total += _statistics_bytes(layer)
    return total


def _statistics_bytes(layer: torch.nn.Module) -> int:
    """The scales bitsandbytes keeps beside the packed weight (NF4: absmax, nested absmax, code)."""
    state = getattr(layer.weight, "quant_state", None)
    if state is not None:
        tensors = [state.absmax, state.code, *([state.state2.absmax, state.state2.code] if state.nested else [])]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    scales = getattr(layer.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    return scales.numel() * scales.element_size() if isinstance(scales, torch.Tensor) else 0


def summary(module: torch.nn.Module, load_dtype: torch.dtype) -> dict[str, Any]:
    """What quantisation did to one component: layers, weights covered, bytes before and after."""
    layers = quantized_layers(module)
    parameters = sum(logical_numel(p) for p in module.parameters())
    quantized = sum(logical_numel(layer.weight) for layer in layers.values())
    unquantized_bytes = sum(
        p.numel() * p.element_size() for p in module.parameters() if not is_quantized_parameter(p)
    ) + sum(b.numel() * b.element_size() for b in module.buffers())
    return {
        "type": quantization_of(module),
        "linear_layers": len(layers),
        "parameters": parameters,
        "quantized_parameters": quantized,
        "quantized_share": quantized / max(parameters, 1),
        "weight_bytes": weight_bytes(module),
        "load_dtype_weight_bytes": unquantized_bytes + quantized * torch.finfo(load_dtype).bits // 8,
    }


def dequantized_linear(layer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Linear:
    """A ``torch.nn.Linear`` holding a bitsandbytes layer's dequantised weight in ``dtype`` (exactly
    the weight the layer computes with) and its bias."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = dequantize_bnb_weight(layer.weight, getattr(layer, "state", None)).to(dtype)
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = torch.nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return linear


def dequantize_component(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace every bitsandbytes layer of ``module`` by its :func:`dequantized_linear` in ``dtype``,
    and unmark the module."""
    for name, layer in quantized_layers(module).items():
        _replace(module, name, dequantized_linear(layer, dtype))
    for flag in (*LOADED_FLAGS.values(), MARK):
        if hasattr(module, flag):
            delattr(module, flag)


def quantization_record(components: dict[str, torch.nn.Module], spec: Any, compute_dtype: torch.dtype) -> dict[str, Any] | None:
    """The record's ``quantization``: what was asked, the backend, and each quantised component's
    summary (weights covered, bytes); None when nothing is quantised."""
    if not spec.active:
        return None
    from importlib import metadata

    return {
        "denoiser": spec.denoiser,
        "text_encoders": spec.text_encoders,
        "backend": "bitsandbytes",
        "backend_version": metadata.version("bitsandbytes"),
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "components": {
            name: summary(module, compute_dtype) for name, module in components.items() if quantization_of(module)
        },
    }
