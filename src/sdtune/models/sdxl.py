"""Stable Diffusion XL: two CLIP text encoders, a UNet with micro-conditioning, DDPM.

Conditioning (Podell et al. 2023, "SDXL", §2.2, as the diffusers pipeline computes it): the
penultimate hidden states of both encoders concatenated along the feature axis, the pooled and
projected output of the second encoder, and ``time_ids`` = (original height, original width, crop
top, crop left, target height, target width) of each sample.
"""

from __future__ import annotations

import torch

from sdtune.models.base import FAMILIES, Conditioning, Model
from sdtune.models.sd1 import (
    CLIP_ATTENTION,
    UNET_ATTENTION,
    UNET_PRESETS,
    UNetBlocks,
    clip_token_ids,
)


def clip_penultimate_and_pooled(
    tokenizer: object, encoder: torch.nn.Module, captions: list[str], max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, the encoder's first output: pooled, projected where it projects)."""
    ids = clip_token_ids(tokenizer, captions, max_length).to(encoder.device)
    output = encoder(ids, output_hidden_states=True)
    return output.hidden_states[-2], output[0]


@FAMILIES.register("sdxl")
class StableDiffusionXL(UNetBlocks, Model):
    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    denoiser_name = "unet"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    trained_text_encoders = ("text_encoder", "text_encoder_2")
    objective = "ddpm"
    default_resolution = 1024
    partial_presets = UNET_PRESETS
    adapter_targets = {"unet": UNET_ATTENTION, "text_encoder": CLIP_ATTENTION, "text_encoder_2": CLIP_ATTENTION}
    vae_in_fp32 = True  # SDXL's original VAE overflows in fp16 (hence the separately distributed fp16-fix VAE)
    pipeline_extras = {"image_encoder": None, "feature_extractor": None, "add_watermarker": False}
    detects_pipelines = ("StableDiffusionXLPipeline",)
    single_file_types = ("xl_base",)

    def unreachable_parameters(self) -> list[str]:
        """CLIP-L conditions through its penultimate hidden states only (its pooled output is not used):
        its last layer and final norm get no gradient."""
        encoder = self.components.get("text_encoder")
        if encoder is None:
            return []
        last = encoder.config.num_hidden_layers - 1
        return [f"text_encoder.*encoder.layers.{last}.*", "text_encoder.*final_layer_norm.*"]

    def encode_prompt(self, captions: list[str]) -> Conditioning:
        states = []
        for encoder_name in self.text_encoder_names:
            tokenizer = self.tokenizers[encoder_name.replace("text_encoder", "tokenizer")]
            hidden, pooled = clip_penultimate_and_pooled(tokenizer, self.components[encoder_name], captions)
            states.append(hidden)
        # the pooled embedding is the last encoder's (text_encoder_2's projection), as in the pipeline
        return {"prompt_embeds": torch.cat(states, dim=-1), "pooled_prompt_embeds": pooled}

    def image_conditioning(self, geometry: torch.Tensor) -> Conditioning:
        return {"time_ids": geometry}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        added = {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": conditioning["time_ids"]}
        return self.denoiser(
            noisy_latents, timesteps, conditioning["prompt_embeds"], added_cond_kwargs=added, return_dict=False
        )[0]
