"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, a 4-channel KL VAE, DDPM.

SD2.x has the same components and conditioning; what differs (OpenCLIP's width, linear attention
projections, v-prediction in 768-px models) lives in the weights and the scheduler config, which
the objective reads. ``sd2`` is a separate name so records and ``family: auto`` say which it is.
"""

from __future__ import annotations

from typing import Any

import torch

from sdtune.models.base import FAMILIES, Conditioning, Model
from sdtune.models.files import read_model_json

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the study's LoRA placement
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_PRESETS = {
    "cross-attention": ["*.attn2.*"],  # text→image attention: what maps prompts onto images
    "attention": ["*.attn1.*", "*.attn2.*"],
    "up-blocks": ["up_blocks.*"],
}


def unet_place(path: str) -> tuple[str, str]:
    """(block, kind) of a diffusers UNet layer: ``down.1``/``mid``/``up.0``/``input``/``output``, and
    self-attention (attn1), cross-attention (attn2), feed-forward, projection (a transformer's
    proj_in/proj_out), time embedding, convolution (resnets, samplers, conv_in/out)."""
    parts = path.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        block = f"{parts[0][:-len('_blocks')]}.{parts[1]}"
    elif parts[0] == "mid_block":
        block = "mid"
    else:
        block = "output" if parts[0] in ("conv_norm_out", "conv_out") else "input"
    roles = (("attn1", "self-attention"), ("attn2", "cross-attention"), ("ff", "feed-forward"),
             ("proj_in", "projection"), ("proj_out", "projection"), ("time_emb_proj", "time embedding"),
             ("time_embedding", "time embedding"), ("add_embedding", "time embedding"), ("class_embedding", "time embedding"))
    kind = next((name for marker, name in roles if marker in parts), "convolution")
    return block, kind


def unet_blocks_in_order(blocks: list[str]) -> list[str]:
    """input, down.0, down.1, …, mid, up.0, up.1, …, output (the UNet's data flow), then the others."""
    def position(block: str) -> tuple[int, int]:
        kind, _, index = block.partition(".")
        rank = {"input": 0, "down": 1, "mid": 2, "up": 3, "output": 4}.get(kind, 5)
        return rank, int(index) if index.isdigit() else 0

    return sorted(blocks, key=position)


def clip_token_ids(tokenizer: Any, captions: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded to ``max_length`` (default: the tokenizer's), as the diffusers pipelines tokenize."""
    length = max_length or tokenizer.model_max_length
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


class UNetBlocks:
    """Where a UNet's weights live, for the anatomy (mixed into the UNet families before Model)."""

    @classmethod
    def denoiser_place(cls, path: str) -> tuple[str, str]:
        return unet_place(path)

    @classmethod
    def blocks_in_order(cls, blocks: list[str]) -> list[str]:
        return unet_blocks_in_order(super().blocks_in_order(blocks))  # type: ignore[misc]


@FAMILIES.register("sd1")
class StableDiffusion1(UNetBlocks, Model):
    family = "sd1"
    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_name = "unet"
    text_encoder_names = ("text_encoder",)
    trained_text_encoders = ("text_encoder",)
    objective = "ddpm"
    default_resolution = 512
    partial_presets = UNET_PRESETS
    adapter_targets = {"unet": UNET_ATTENTION, "text_encoder": CLIP_ATTENTION}
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False, "image_encoder": None}
    detects_pipelines = ("StableDiffusionPipeline",)
    single_file_types = ("v1",)

    @classmethod
    def matches_index(cls, model: str, revision: str | None = None) -> bool:
        return not _is_sd2(model, revision)

    def encode_prompt(self, captions: list[str]) -> Conditioning:
        encoder = self.components["text_encoder"]
        ids = clip_token_ids(self.tokenizers["tokenizer"], captions).to(encoder.device)
        return {"prompt_embeds": encoder(ids, return_dict=False)[0]}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return self.denoiser(noisy_latents, timesteps, conditioning["prompt_embeds"], return_dict=False)[0]


@FAMILIES.register("sd2")
class StableDiffusion2(StableDiffusion1):
    """SD 2.x (OpenCLIP ViT-H text encoder; the 768-px models predict v)."""

    family = "sd2"
    default_resolution = 768
    single_file_types = ("v2",)

    @classmethod
    def matches_index(cls, model: str, revision: str | None = None) -> bool:
        return _is_sd2(model, revision)


def _is_sd2(model: str, revision: str | None) -> bool:
    """SD2's UNet uses linear attention projections (SD1's uses 1×1 convolutions)."""
    unet = read_model_json(model, "unet/config.json", revision) or {}
    return bool(unet.get("use_linear_projection"))
