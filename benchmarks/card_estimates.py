"""The ``--estimate`` of each shipped card config (src/sdtune/configs/cards/), for docs/memory.md.

``sdtune train --estimate`` reads only a model's configs and tokenizer files. This machine reaches no
model hub, so the configs of SD 1.5, SDXL base 1.0 and SD 3.5 Large are written here from their
published ``config.json`` values (architecture only: the tokenizer is a small one; the text
encoders keep CLIP's 49 408-token embedding through ``vocab_size``), and each card config is
estimated with ``--set model.path=<that folder>``. With hub access the same numbers come from
``sdtune train <card> --estimate --budget <size>`` directly.

    python benchmarks/card_estimates.py [--out benchmarks/results/card_estimates.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CLIP_VOCAB = 49408
CARDS = {  # config → (architecture, budget)
    "sdxl-lora-12gb": ("sdxl", "12GB"),
    "sd35-large-lora-24gb": ("sd35-large", "24GB"),
    "sd15-full-ema-24gb": ("sd15", "24GB"),
}


def _clip(folder: Path, hidden: int, layers: int, heads: int, act: str, with_projection: bool) -> tuple[str, str]:
    from transformers import CLIPTextConfig

    CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ).save_pretrained(folder)
    return "transformers", "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"


def _diffusers(folder: Path, class_name: str, **config) -> tuple[str, str]:
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        getattr(diffusers, class_name)(**config).save_config(folder)
    return "diffusers", class_name


def _tokenizer(folder: Path) -> tuple[str, str]:
    from sdtune.testing.tiny import write_tokenizer

    write_tokenizer(folder, ["a", "photo"], 77)
    return "transformers", "CLIPTokenizer"


def _scheduler(folder: Path, class_name: str, **config) -> tuple[str, str]:
    import diffusers

    getattr(diffusers, class_name)(**config).save_config(folder)
    return "diffusers", class_name


VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
       "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}


def write_architecture(name: str, folder: Path) -> Path:
    """Configs and tokenizers of ``name`` (sd15, sdxl, sd35-large) in a diffusers folder layout."""
    parts: dict[str, tuple[str, str]] = {}
    if name == "sd15":
        pipeline = "StableDiffusionPipeline"
        parts["unet"] = _diffusers(
            folder / "unet", "UNet2DConditionModel", sample_size=64, layers_per_block=2, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        )
        parts["vae"] = _diffusers(folder / "vae", "AutoencoderKL", latent_channels=4, sample_size=512, **VAE)
        parts["text_encoder"] = _clip(folder / "text_encoder", 768, 12, 12, "quick_gelu", False)
        parts["tokenizer"] = _tokenizer(folder / "tokenizer")
        parts["scheduler"] = _scheduler(folder / "scheduler", "PNDMScheduler", beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012, skip_prk_steps=True)
    elif name == "sdxl":
        pipeline = "StableDiffusionXLPipeline"
        parts["unet"] = _diffusers(
            folder / "unet", "UNet2DConditionModel", sample_size=128, layers_per_block=2, cross_attention_dim=2048,
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )
        parts["vae"] = _diffusers(folder / "vae", "AutoencoderKL", latent_channels=4, sample_size=1024,
                                  scaling_factor=0.13025, **VAE)
        parts["text_encoder"] = _clip(folder / "text_encoder", 768, 12, 12, "quick_gelu", False)
        parts["text_encoder_2"] = _clip(folder / "text_encoder_2", 1280, 32, 20, "gelu", True)
        parts["tokenizer"], parts["tokenizer_2"] = _tokenizer(folder / "tokenizer"), _tokenizer(folder / "tokenizer_2")
        parts["scheduler"] = _scheduler(folder / "scheduler", "EulerDiscreteScheduler", beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012)
    else:
        pipeline = "StableDiffusion3Pipeline"
        parts["transformer"] = _diffusers(
            folder / "transformer", "SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, num_layers=38,
            attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
        )
        parts["vae"] = _diffusers(folder / "vae", "AutoencoderKL", latent_channels=16, sample_size=1024,
                                  scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                                  use_post_quant_conv=False, **VAE)
        parts["text_encoder"] = _clip(folder / "text_encoder", 768, 12, 12, "quick_gelu", True)
        parts["text_encoder_2"] = _clip(folder / "text_encoder_2", 1280, 32, 20, "gelu", True)
        parts["tokenizer"], parts["tokenizer_2"] = _tokenizer(folder / "tokenizer"), _tokenizer(folder / "tokenizer_2")
        parts["text_encoder_3"] = parts["tokenizer_3"] = (None, None)  # T5-XXL: the card config leaves it out
        parts["scheduler"] = _scheduler(folder / "scheduler", "FlowMatchEulerDiscreteScheduler", shift=3.0)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **{k: list(v) for k, v in parts.items()}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def estimate_arguments(description: str) -> argparse.Namespace:
    """The command line of the estimate benchmarks: where the architectures go, the data, the output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", default="/tmp/sdtune-card-architectures")
    parser.add_argument("--data", required=True, help="any captioned imagefolder (the estimate reads no image)")
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def main() -> int:
    args = estimate_arguments(__doc__.splitlines()[0])
    import sdtune

    results = {}
    for card, (architecture, budget) in CARDS.items():
        folder = write_architecture(architecture, Path(args.work) / architecture)
        # a shipped config, found by its bare name
        experiment = sdtune.load_experiment(card, [f"model.path={folder}", f"data.source={args.data}"])
        for estimate in sdtune.estimate_memory(experiment, budget=budget):
            print(f"$ sdtune train {card} --estimate --budget {budget}\n{estimate.describe()}\n", flush=True)
            results[card] = {"budget": budget, "total_bytes": estimate.total, "text": estimate.describe(),
                             "fits_with": estimate.fits_with, "fitted_total_bytes": estimate.fitted_total}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
