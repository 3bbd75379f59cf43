"""Single-file checkpoints in the original layout: diffusers components → one ``.safetensors``.

The layouts are the ones the original repositories (and so A1111, ComfyUI and diffusers'
``from_single_file``) use; each family names its components' prefixes and layouts in
``ModelFamily.single_file_layout``:

- UNet (SD1/2: CompVis LDM; SDXL: Stability's SGM, the same block arithmetic):
  ``model.diffusion_model.{input_blocks,middle_block,output_blocks}.…``;
- VAE: ``first_stage_model.{encoder,decoder}.{down,mid,up}.…``, attention projections as 1×1 convs;
- CLIP in the Hugging Face layout (SD1, SDXL's first encoder, SD3's two):
  ``<prefix>text_model.…``, whatever transformers' own module nesting is;
- OpenCLIP (SD2's encoder, SDXL's second): ``<prefix>transformer.resblocks.N.attn.in_proj_weight``
  (q, k and v fused), ``ln_1``, ``mlp.c_fc``, ``positional_embedding``, ``text_projection`` (transposed);
- MMDiT (SD3): ``model.diffusion_model.joint_blocks.N.{x_block,context_block}.attn.qkv…``;
- T5: ``text_encoders.t5xxl.transformer.…`` as transformers names it.

Every converter is the exact inverse of the one in diffusers' ``single_file_utils`` (tested by a
round trip through ``from_single_file``); a key it does not know fails loudly instead of being
dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdtune.util import atomic

Tensors = dict[str, torch.Tensor]

RESNET_NAMES = {  # diffusers ResnetBlock2D → LDM ResBlock
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL's text_time
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


class UnknownKeyError(ValueError):
    """A weight that no rule of the layout maps (a new architecture variant): refuse, never drop."""


# -- UNet (LDM / SGM) ---------------------------------------------------------------------------
def unet_original_key(key: str, config: Any) -> str:
    """The LDM/SGM name of a diffusers UNet weight. Input blocks are numbered 1, 2, … with
    ``layers_per_block`` resnets (+ attentions) and one downsampler per down block; output blocks
    with ``layers_per_block + 1`` layers, the upsampler in the last one (after its attention)."""
    per_block = int(config["layers_per_block"]) + 1
    name, _, leaf = key.rpartition(".")
    if name in UNET_TOP_LEVEL:
        return f"{UNET_TOP_LEVEL[name]}.{leaf}"
    match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if match:
        side, block, kind, layer, rest = match.groups()
        block, layer = int(block), int(layer)
        if side == "down":
            if kind == "downsamplers":
                return f"input_blocks.{(block + 1) * per_block}.0.op.{rest.removeprefix('conv.')}"
            index = 1 + block * per_block + layer
        else:
            if kind == "upsamplers":
                has_attention = "CrossAttn" in config["up_block_types"][block]
                return f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention else 1}.{rest}"
            index = block * per_block + layer
        blocks = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            return f"{blocks}.{index}.0.{_rename_first(rest, RESNET_NAMES)}"
        return f"{blocks}.{index}.1.{rest}"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if match:
        kind, layer, rest = match.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if layer == '0' else 2}.{_rename_first(rest, RESNET_NAMES)}"
    raise UnknownKeyError(f"UNet weight {key!r} has no original-layout name")


def unet_to_original(state: Tensors, config: Any) -> Tensors:
    return {unet_original_key(key, config): value for key, value in state.items()}


def _rename_first(rest: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise UnknownKeyError(f"{rest!r} is not one of {sorted(names)}")


# -- VAE ------------------------------------------------------------------------------------------
def vae_original_key(key: str, config: Any) -> str:
    """The LDM name of a diffusers AutoencoderKL weight (decoder blocks are numbered in reverse)."""
    top = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    name, _, leaf = key.rpartition(".")
    if name in top:
        return f"{top[name]}.{leaf}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)|(post_)?quant_conv", name):
        return key
    match = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if match:
        part, side, block, kind, layer, rest = match.groups()
        block = int(block) if side == "down" else len(config["up_block_types"]) - 1 - int(block)
        if kind == "resnets":
            return f"{part}.{side}.{block}.block.{layer}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{side}.{block}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
    match = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if match:
        part, kind, layer, rest = match.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(layer) + 1}.{rest}"
        module, _, leaf = rest.rpartition(".")
        if module in VAE_ATTENTION_NAMES:
            return f"{part}.mid.attn_1.{VAE_ATTENTION_NAMES[module]}.{leaf}"
    raise UnknownKeyError(f"VAE weight {key!r} has no original-layout name")


def vae_to_original(state: Tensors, config: Any) -> Tensors:
    result = {}
    for key, value in state.items():
        original = vae_original_key(key, config)
        if ".mid.attn_1." in original and original.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # the original attention projections are 1×1 convolutions
        result[original] = value
    return result


# -- text encoders --------------------------------------------------------------------------------
def canonical_clip_state(module: torch.nn.Module) -> Tensors:
    """A CLIP text encoder's weights under the original names (``text_model.…``, ``text_projection.…``):
    transformers ≥ 5 flattened ``CLIPTextModel`` (no ``text_model`` level), the checkpoints never did."""
    state = module.state_dict()
    if hasattr(module, "text_model"):
        return dict(state)
    return {key if key.startswith("text_projection.") else f"text_model.{key}": value for key, value in state.items()}


def canonical_clip_path(module: torch.nn.Module, path: str) -> str:
    """A module path of a CLIP text encoder in the original nesting (see :func:`canonical_clip_state`)."""
    if hasattr(module, "text_model") or path.startswith("text_projection"):
        return path
    return f"text_model.{path}"


def clip_to_original(module: torch.nn.Module) -> Tensors:
    state = canonical_clip_state(module)
    state.pop("text_model.embeddings.position_ids", None)  # a buffer some versions save; not a weight
    return state


def open_clip_to_original(module: torch.nn.Module) -> Tensors:
    """OpenCLIP's names for a Hugging Face CLIP text encoder: q, k, v fused into ``in_proj``."""
    state = clip_to_original(module)
    result: Tensors = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in OPEN_CLIP_TOP_LEVEL:
            result[OPEN_CLIP_TOP_LEVEL[key]] = value
            continue
        if key == "text_projection.weight":
            result["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
            continue
        match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not match:
            raise UnknownKeyError(f"text encoder weight {key!r} has no OpenCLIP name")
        layer, module_name, leaf = match.groups()
        block = f"transformer.resblocks.{layer}"
        projection = re.fullmatch(r"self_attn\.([qkv])_proj", module_name)
        if projection:
            fused.setdefault(f"{block}.attn.in_proj_{leaf}", {})[projection.group(1)] = value
        elif module_name in OPEN_CLIP_LAYER_NAMES:
            result[f"{block}.{OPEN_CLIP_LAYER_NAMES[module_name]}.{leaf}"] = value
        else:
            raise UnknownKeyError(f"text encoder weight {key!r} has no OpenCLIP name")
    return {**result, **_fuse_qkv(fused)}


def _fuse_qkv(fused: dict[str, dict[str, torch.Tensor]]) -> Tensors:
    """Separate q, k, v projections → one in_proj/qkv tensor, stacked in that order on the output axis."""
    return {key: torch.cat([parts["q"], parts["k"], parts["v"]], dim=0) for key, parts in fused.items()}


def t5_to_original(module: torch.nn.Module) -> Tensors:
    return dict(module.state_dict())


# -- MMDiT (SD3) ----------------------------------------------------------------------------------
MMDIT_TOP_LEVEL = {
    "pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
}
MMDIT_BLOCK_NAMES = {  # inside transformer_blocks.N (the q/k/v projections are fused separately)
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
MMDIT_QKV = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.to_": "x_block.attn2.qkv"}


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """SD3's final modulations are stored (shift, scale) in the original and (scale, shift) in diffusers."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_to_original(state: Tensors, config: Any) -> Tensors:
    last = int(config["num_layers"]) - 1
    result: Tensors = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        if key in MMDIT_TOP_LEVEL:  # a bare tensor (the positional embedding)
            result[MMDIT_TOP_LEVEL[key]] = value
        elif name in MMDIT_TOP_LEVEL:
            result[f"{MMDIT_TOP_LEVEL[name]}.{leaf}"] = value
        elif name == "norm_out.linear":
            result[f"final_layer.adaLN_modulation.1.{leaf}"] = swap_halves(value)
        else:
            match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
            if not match:
                raise UnknownKeyError(f"transformer weight {key!r} has no original-layout name")
            block, inner = match.groups()
            prefix = f"joint_blocks.{block}"
            qkv = re.fullmatch(r"(attn\.to_|attn\.add_|attn2\.to_)([qkv])(_proj)?", inner)
            if qkv and (qkv.group(1) == "attn.add_") == bool(qkv.group(3)):
                fused.setdefault(f"{prefix}.{MMDIT_QKV[qkv.group(1)]}.{leaf}", {})[qkv.group(2)] = value
            elif inner in MMDIT_BLOCK_NAMES:
                if inner == "norm1_context.linear" and int(block) == last:
                    value = swap_halves(value)  # the last block's context stream only modulates (scale, shift)
                result[f"{prefix}.{MMDIT_BLOCK_NAMES[inner]}.{leaf}"] = value
            else:
                raise UnknownKeyError(f"transformer weight {key!r} has no original-layout name")
    return {**result, **_fuse_qkv(fused)}


# -- the whole checkpoint -------------------------------------------------------------------------
def _model_config(module: torch.nn.Module) -> Any:
    return dict(module.config)


LAYOUTS: dict[str, Callable[[torch.nn.Module], Tensors]] = {
    "unet": lambda module: unet_to_original(module.state_dict(), _model_config(module)),
    "vae": lambda module: vae_to_original(module.state_dict(), _model_config(module)),
    "mmdit": lambda module: mmdit_to_original(module.state_dict(), _model_config(module)),
    "clip": clip_to_original,
    "open_clip": open_clip_to_original,
    "t5": t5_to_original,
}


def original_state_dict(components: dict[str, Any], layout: dict[str, tuple[str, str]]) -> Tensors:
    """Every weight of the pipeline's components, under the original names and prefixes.

    ``layout``: component → (key prefix, layout name), the family's ``single_file_layout``.
    Components the pipeline does not have (SD3 without T5) are left out.
    """
    result: Tensors = {}
    for component, (prefix, kind) in layout.items():
        module = components.get(component)
        if module is None:
            continue
        for key, value in LAYOUTS[kind](module).items():
            full_key = prefix + key
            if full_key in result:
                raise UnknownKeyError(f"two weights map to {full_key!r}; the {kind} layout is wrong for {component}")
            result[full_key] = value
    return result


def save_single_file(
    components: dict[str, Any], layout: dict[str, tuple[str, str]], path: Path, metadata: dict[str, str],
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the checkpoint (``dtype`` None keeps each weight's own precision, so the file is exact)."""
    tensors = original_state_dict(components, layout)
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu", dtype=dtype if dtype is not None and value.is_floating_point() else None)
        pointer = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if pointer in seen else value.contiguous()  # tied weights (T5) become copies
        seen.add(pointer)
    return atomic.save_tensors(path, tensors, {"format": "pt", **metadata})
