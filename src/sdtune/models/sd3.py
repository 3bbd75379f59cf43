"""Stable Diffusion 3 / 3.5: CLIP-L, CLIP-G and (optional) T5-XXL, an MMDiT transformer, a
16-channel VAE with a latent shift, rectified flow.

Conditioning (Esser et al. 2024, "Scaling Rectified Flow Transformers", §5.2, as the diffusers
pipeline computes it): the penultimate states of both CLIPs concatenated on the feature axis and
zero-padded to T5's width, followed on the sequence axis by T5's states (zeros when T5 is not
loaded, as people do to save memory); the pooled embeddings of both CLIPs concatenated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sdtune.models.base import FAMILIES, Conditioning, ModelBundle, ModelFamily, read_model_json
from sdtune.models.sd1 import CLIP_ATTENTION
from sdtune.models.sdxl import clip_penultimate_and_pooled

if TYPE_CHECKING:
    from sdtune.config.sections import ModelConfig

T5_TOKENS = 77  # T5 sequence length in training and sampling (the diffusers SD3 training default)
JOINT_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
T5_ATTENTION = ["q", "k", "v", "o"]


@FAMILIES.register("sd3")
class StableDiffusion3(ModelFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trained_text_encoders = ("text_encoder", "text_encoder_2")  # T5-XXL (4.7 B) stays frozen unless named
    objective = "flow"
    default_resolution = 1024
    kohya_prefixes: ClassVar[dict[str, str] | None] = None  # no kohya trainer names for SD3: see community_prefixes
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
    single_file_layout: ClassVar[dict[str, tuple[str, str]]] = {  # Stability's SD3 checkpoints
        "transformer": ("model.diffusion_model.", "mmdit"), "vae": ("first_stage_model.", "vae"),
        "text_encoder": ("text_encoders.clip_l.transformer.", "clip"),
        "text_encoder_2": ("text_encoders.clip_g.transformer.", "clip"),
        "text_encoder_3": ("text_encoders.t5xxl.transformer.", "t5"),
    }
    # SimpleTuner's LyCORIS names for the transformer (what ComfyUI maps for SD3) and ComfyUI's/OneTrainer's
    # lora_te1/2/3 for CLIP-L, CLIP-G and T5
    community_prefixes: ClassVar[dict[str, str]] = {
        "transformer": "lycoris_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
        "text_encoder_3": "lora_te3_",
    }
    embedding_keys: ClassVar[dict[str, str]] = {  # ComfyUI's SD3 embedding keys
        "text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl",
    }
    modelspec_architecture = "stable-diffusion-3"
    kohya_base_model_version = "sd3"
    kohya_trainer_names_unet = "none"  # the community file follows SimpleTuner/ComfyUI (lycoris_…)
    generation_kwargs: ClassVar[dict[str, Any]] = {"max_sequence_length": T5_TOKENS}

    def text_encoder_kwargs(self, path: str, config: ModelConfig | None) -> dict[str, Any]:
        index = read_model_json(path, "model_index.json", config.revision if config else None) or {}
        saved_without_t5 = index.get("text_encoder_3", [None])[0] is None and "_class_name" in index
        if (config is not None and not config.text_encoder_3) or saved_without_t5:
            return {"text_encoder_3": None, "tokenizer_3": None}  # diffusers needs both named to load without T5
        return {}

    def encode_prompt(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        clip_states, pooled = [], []
        tokenizer = bundle.tokenizers["tokenizer"]  # the pipeline tokenizes both CLIPs to its length
        for encoder_name in ("text_encoder", "text_encoder_2"):
            hidden, projected = clip_penultimate_and_pooled(
                bundle.tokenizers[encoder_name.replace("text_encoder", "tokenizer")],
                bundle.components[encoder_name],
                captions,
                max_length=tokenizer.model_max_length,
            )
            clip_states.append(hidden)
            pooled.append(projected)
        clip = torch.cat(clip_states, dim=-1)
        t5 = self._t5_states(bundle, captions, clip)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def _t5_states(self, bundle: ModelBundle, captions: list[str], clip: torch.Tensor) -> torch.Tensor:
        encoder = bundle.components.get("text_encoder_3")
        if encoder is None:
            width = bundle.denoiser.config.joint_attention_dim  # zeros where T5's states would be, as the pipeline does
            return torch.zeros(len(captions), T5_TOKENS, width, device=clip.device, dtype=clip.dtype)
        ids = bundle.tokenizers["tokenizer_3"](
            captions, padding="max_length", max_length=T5_TOKENS, truncation=True, add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return encoder(ids.to(encoder.device))[0]

    def predict(
        self, bundle: ModelBundle, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        return bundle.denoiser(
            hidden_states=noisy_latents,
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

