"""Small Stable Diffusion pipelines built in code: the exact SD architecture at toy sizes.

Used by the tests, the benchmarks and the built-in demo (which pretrains one of these). Nothing
here downloads anything: the tokenizer's vocabulary is written from a word list.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a toy SD pipeline (defaults: the test fixture, ~0.2 M parameters)."""

    unet_channels: tuple[int, ...] = (16, 32)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    vae_channels: tuple[int, ...] = (16, 32)  # downsampling factor 2^(len-1)
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16
    norm_groups: int = 8
    sample_size: int = 16  # latent side the UNet is configured for


def write_tokenizer(folder: Path, words: list[str], max_tokens: int) -> None:
    """A CLIP BPE tokenizer whose vocabulary holds ``words`` whole, plus single characters.

    Every character (with and without the end-of-word mark) is in the vocabulary, so any text
    tokenizes; the listed words get merges that build them into one token each.
    """
    folder.mkdir(parents=True, exist_ok=True)
    characters = string.ascii_lowercase + string.digits + ".,!?'-:;()/&+"
    vocab: dict[str, int] = {}
    for token in [*characters, *(c + "</w>" for c in characters)]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in sorted({w.lower() for w in words if w}):
        symbols = [*word[:-1], word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            pair = f"{merged} {symbol}"
            if pair not in merges:
                merges.append(pair)
            merged += symbol
            vocab.setdefault(merged, len(vocab))  # BPE needs every merge result in the vocabulary
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # loading from files (not the constructor) works across transformers 4.x and 5.x
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)


def build_tiny_pipeline(
    folder: Path, words: list[str] | None = None, sizes: TinySizes | None = None, seed: int = 0
):
    """Write a random-weight SD pipeline folder (diffusers format, safetensors) and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sizes = sizes or TinySizes()
    folder = Path(folder)
    write_tokenizer(folder / "tokenizer", words or [], sizes.max_tokens)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    # SD's layout: cross-attention in every block but the deepest
    down = ["CrossAttnDownBlock2D"] * (len(sizes.unet_channels) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(sizes.unet_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=sizes.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=sizes.unet_channels,
        layers_per_block=sizes.unet_layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=sizes.text_hidden,
        attention_head_dim=sizes.unet_attention_head_dim,
        norm_num_groups=sizes.norm_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=sizes.vae_channels,
        down_block_types=["DownEncoderBlock2D"] * len(sizes.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(sizes.vae_channels),
        latent_channels=4,
        norm_num_groups=sizes.norm_groups,
        sample_size=sizes.sample_size * 2 ** (len(sizes.vae_channels) - 1),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=sizes.text_hidden,
            intermediate_size=sizes.text_hidden * 4,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=sizes.text_heads,
            max_position_embeddings=sizes.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # SD1.x's noise schedule; DDIM samples well in few steps
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_tiny_clip(folder: Path, words: list[str] | None = None, seed: int = 0) -> Path:
    """Write a random-weight CLIP (transformers ``CLIPModel``) folder with tokenizer and preprocessing.

    Stands in for a real CLIP so the CLIP metrics run for real (numbers are meaningless).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    write_tokenizer(folder, words or [], max_tokens=16)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    preprocessing = {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessing))
    return folder
