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


def clip_token_ids(tokenizer: Any, captions: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded to ``max_length`` (default: the tokenizer's), as the diffusers pipelines tokenize."""
    length = max_length or tokenizer.model_max_length
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


@FAMILIES.register("sd1")
class StableDiffusion1(Model):
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
