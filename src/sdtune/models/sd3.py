"""Stable Diffusion 3 / 3.5: CLIP-L, CLIP-G and (optional) T5-XXL, an MMDiT transformer, a
16-channel VAE with a latent shift, rectified flow.

Conditioning (Esser et al. 2024, "Scaling Rectified Flow Transformers", §5.2, as the diffusers
pipeline computes it): the penultimate states of both CLIPs concatenated on the feature axis and
zero-padded to T5's width, followed on the sequence axis by T5's states (zeros when T5 is not
loaded, as people do to save memory); the pooled embeddings of both CLIPs concatenated.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from sdtune.config import ModelConfig
from sdtune.models.base import FAMILIES, Conditioning, Model
from sdtune.models.files import read_model_json
from sdtune.models.sd1 import CLIP_ATTENTION
from sdtune.models.sdxl import clip_penultimate_and_pooled

T5_TOKENS = 77  # T5 sequence length in training and sampling (the diffusers SD3 training default)
JOINT_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
T5_ATTENTION = ["q", "k", "v", "o"]


@FAMILIES.register("sd3")
class StableDiffusion3(Model):
    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trained_text_encoders = ("text_encoder", "text_encoder_2")  # T5-XXL (4.7 B) stays frozen unless named
    objective = "flow"
    default_resolution = 1024
    partial_presets = {  # the first is the default
        "context": [  # the text stream of the joint attention blocks: the MMDiT's closest to cross-attention
            "transformer_blocks.*.attn.add_*", "transformer_blocks.*.attn.to_add_out.*",
            "transformer_blocks.*.ff_context.*",
        ],
        "attention": ["transformer_blocks.*.attn.*"],
    }
    adapter_targets = {
        "transformer": JOINT_ATTENTION, "text_encoder": CLIP_ATTENTION, "text_encoder_2": CLIP_ATTENTION,
        "text_encoder_3": T5_ATTENTION,
    }
    pipeline_extras = {"image_encoder": None, "feature_extractor": None}
    detects_pipelines = ("StableDiffusion3Pipeline",)
    single_file_types = ("sd3", "sd35_medium", "sd35_large")
    generation_kwargs: ClassVar[dict[str, Any]] = {"max_sequence_length": T5_TOKENS}
    swappable_blocks = "transformer_blocks"  # the joint blocks (38 in SD 3.5 Large, 24 in Medium)

    @classmethod
    def denoiser_place(cls, path: str) -> tuple[str, str]:
        """The MMDiT by depth (``block 00``, …; ``input``: patch, time and text embedders; ``output``),
        and by stream: the joint attention's image (to_q/k/v, to_out) and text (add_*_proj, to_add_out)
        projections, the two feed-forwards, the adaptive norms' modulation."""
        parts = path.split(".")
        if parts[0] == "transformer_blocks" and len(parts) > 1:
            block = f"block {int(parts[1]):02d}"
        else:
            block = "output" if parts[0] in ("norm_out", "proj_out") else "input"
        roles = (("add_q_proj", "attention (text stream)"), ("add_k_proj", "attention (text stream)"),
                 ("add_v_proj", "attention (text stream)"), ("to_add_out", "attention (text stream)"),
                 ("attn", "attention (image stream)"), ("attn2", "attention (image stream)"),
                 ("ff_context", "feed-forward (text stream)"), ("ff", "feed-forward"), ("norm1", "modulation"),
                 ("norm1_context", "modulation"), ("norm_out", "modulation"), ("pos_embed", "embedding"),
                 ("time_text_embed", "time embedding"), ("context_embedder", "projection"), ("proj_out", "projection"))
        kind = next((name for marker, name in roles if marker in parts), "other")
        return block, kind

    @classmethod
    def blocks_in_order(cls, blocks: list[str]) -> list[str]:
        """input, block 00, block 01, …, output, then the text encoders."""
        rank = {"input": 0, "output": 2}
        return sorted(super().blocks_in_order(blocks), key=lambda block: rank.get(block, 1 if block.startswith("block ") else 3))

    def unreachable_parameters(self) -> list[str]:
        """The last joint block keeps only the image stream (``context_pre_only``): the text tokens'
        queries there are computed and discarded, so ``add_q_proj`` gets no gradient."""
        last = self.denoiser.config.num_layers - 1
        return [f"transformer.transformer_blocks.{last}.attn.add_q_proj.*"]

    @classmethod
    def text_encoder_kwargs(cls, path: str, config: ModelConfig | None) -> dict[str, Any]:
        index = read_model_json(path, "model_index.json", config.revision if config else None) or {}
        saved_without_t5 = index.get("text_encoder_3", [None])[0] is None and "_class_name" in index
        if (config is not None and not config.text_encoder_3) or saved_without_t5:
            return {"text_encoder_3": None, "tokenizer_3": None}  # diffusers needs both named to load without T5
        return {}

    def encode_prompt(self, captions: list[str]) -> Conditioning:
        clip_states, pooled = [], []
        tokenizer = self.tokenizers["tokenizer"]  # the pipeline tokenizes both CLIPs to its length
        for encoder_name in ("text_encoder", "text_encoder_2"):
            hidden, projected = clip_penultimate_and_pooled(
                self.tokenizers[encoder_name.replace("text_encoder", "tokenizer")],
                self.components[encoder_name],
                captions,
                max_length=tokenizer.model_max_length,
            )
            clip_states.append(hidden)
            pooled.append(projected)
        clip = torch.cat(clip_states, dim=-1)
        t5 = self._t5_states(captions, clip)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def _t5_states(self, captions: list[str], clip: torch.Tensor) -> torch.Tensor:
        encoder = self.components.get("text_encoder_3")
        if encoder is None:
            width = self.denoiser.config.joint_attention_dim  # zeros where T5's states would be, as the pipeline does
            return torch.zeros(len(captions), T5_TOKENS, width, device=clip.device, dtype=clip.dtype)
        ids = self.tokenizers["tokenizer_3"](
            captions, padding="max_length", max_length=T5_TOKENS, truncation=True, add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return encoder(ids.to(encoder.device))[0]

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return self.denoiser(
            hidden_states=noisy_latents,
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

