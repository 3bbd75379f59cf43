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
    # one line per merge (an empty line, as "\n".join gave for no merges, breaks BPE loading)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges))
    from transformers import CLIPTokenizer

    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # loading from files (not the constructor) works across transformers 4.x and 5.x
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)


def build_tiny_pipeline(
    folder: Path, words: list[str] | None = None, sizes: TinySizes | None = None, seed: int = 0
):
    """Write a random-weight SD pipeline folder (diffusers format, safetensors) and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sizes = sizes or TinySizes()
    folder = Path(folder)
    write_tokenizer(folder / "tokenizer", words or [], sizes.max_tokens)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = _sd_unet(sizes, attention_head_dim=sizes.unet_attention_head_dim)
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


def _sd_unet(sizes: TinySizes, **options):
    """SD's UNet layout at toy size: cross-attention in every block but the deepest."""
    from diffusers import UNet2DConditionModel

    depth = len(sizes.unet_channels)
    return UNet2DConditionModel(
        sample_size=sizes.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=sizes.unet_channels,
        layers_per_block=sizes.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        cross_attention_dim=sizes.text_hidden,
        norm_num_groups=sizes.norm_groups,
        **options,
    )


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


# --- other model families: SD 2.x, SDXL, SD3 (same toy scale, each family's own layout) ---

T5_SPACE = "\u2581"  # SentencePiece's word-start mark, which T5's tokenizer prepends to every word


def write_t5_tokenizer(folder: Path, words: list[str], max_tokens: int) -> None:
    """A T5 (Unigram) tokenizer whose vocabulary holds ``words`` whole, plus single characters.

    Built with the ``tokenizers`` library and saved as ``tokenizer.json``, so no SentencePiece model is
    needed. T5's layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no ``<extra_id_*>`` sentinels. Whole
    words score far above characters, so a listed word is always one token; anything else falls
    back to characters.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, T5_SPACE: -2.0}
    for word in sorted({w for w in words if w} | {w.lower() for w in words if w}):
        pieces.setdefault(T5_SPACE + word, -1.0)
    characters = string.ascii_letters + string.digits + ".,!?'-:;()/&+"
    for character in characters:
        pieces.setdefault(T5_SPACE + character, -8.0)
        pieces.setdefault(character, -8.0)
    tokenizer = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2, byte_fallback=False))
    metaspace = {"replacement": T5_SPACE, "prepend_scheme": "always", "split": True}
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tokenizer.decoder = decoders.Metaspace(**metaspace)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer", "model_max_length": max_tokens, "extra_ids": 0,
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import T5TokenizerFast  # transformers 5: an alias of T5Tokenizer

    T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)


def _clip_tokenizer(folder: Path, words: list[str], max_tokens: int, pad_token: str | None = None):
    """``write_tokenizer``, optionally with another padding token (SD2 and SDXL's second use "!")."""
    from transformers import CLIPTokenizer

    write_tokenizer(folder, words, max_tokens)
    if pad_token is not None:
        CLIPTokenizer.from_pretrained(folder, pad_token=pad_token).save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def _clip_text_config(tokenizer, hidden: int, heads: int, layers: int, hidden_act: str, projection_dim: int = 0):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_vae(sizes: TinySizes, latent_channels: int, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=sizes.vae_channels,
        down_block_types=["DownEncoderBlock2D"] * len(sizes.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(sizes.vae_channels),
        latent_channels=latent_channels,
        norm_num_groups=sizes.norm_groups,
        sample_size=sizes.sample_size * 2 ** (len(sizes.vae_channels) - 1),
        **kwargs,
    )


def build_tiny_sd2_pipeline(folder: Path, words: list[str] | None = None, seed: int = 0):
    """Write a random-weight SD 2.x-style pipeline folder (v-prediction) and return it.

    SD2's differences from SD1 at toy scale: linear projections in the UNet's transformers, a head
    count per block, an OpenCLIP-style text encoder (gelu, "!" padding) and v-prediction.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    sizes = TinySizes()
    folder = Path(folder)
    tokenizer = _clip_tokenizer(folder / "tokenizer", words or [], sizes.max_tokens, pad_token="!")
    torch.manual_seed(seed)
    unet = _sd_unet(  # diffusers' UNet reads attention_head_dim as the head count: 8 channels per head here
        sizes, attention_head_dim=tuple(c // 8 for c in sizes.unet_channels), use_linear_projection=True,
        upcast_attention=False,
    )
    vae = _tiny_vae(sizes, latent_channels=4)
    text_encoder = CLIPTextModel(
        _clip_text_config(tokenizer, sizes.text_hidden, sizes.text_heads, sizes.text_layers, "gelu")
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_tiny_sdxl_pipeline(folder: Path, words: list[str] | None = None, seed: int = 0):
    """Write a random-weight SDXL pipeline folder and return it.

    SDXL's layout at toy scale: no attention in the first block, more transformer layers deeper,
    two text encoders whose penultimate hidden states are concatenated (16 + 32 = 48 channels of
    cross-attention), and the second encoder's pooled projection (16) plus six size/crop numbers
    (6 x 8) as the UNet's extra "text_time" embedding.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sizes = TinySizes()
    folder = Path(folder)
    words = words or []
    tokenizer = _clip_tokenizer(folder / "tokenizer", words, sizes.max_tokens)
    tokenizer_2 = _clip_tokenizer(folder / "tokenizer_2", words, sizes.max_tokens, pad_token="!")
    hidden, hidden_2, projection_dim, time_dim = 16, 32, 16, 8
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden, 2, sizes.text_layers, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(tokenizer_2, hidden_2, 4, sizes.text_layers, "gelu", projection_dim=projection_dim)
    )
    unet = UNet2DConditionModel(
        sample_size=sizes.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=sizes.unet_channels,
        layers_per_block=sizes.unet_layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=tuple(c // 8 for c in sizes.unet_channels),  # head counts (diffusers' naming)
        use_linear_projection=True,
        cross_attention_dim=hidden + hidden_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
        norm_num_groups=sizes.norm_groups,
    )
    vae = _tiny_vae(sizes, latent_channels=4, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=None, feature_extractor=None,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_tiny_sd3_pipeline(folder: Path, words: list[str] | None = None, seed: int = 0, with_t5: bool = True):
    """Write a random-weight SD3 pipeline folder (MMDiT, flow matching) and return it.

    Two CLIP encoders with projections (hidden 16 each: their concatenation exactly fills the T5
    width of 32), a T5 encoder (omitted, with its tokenizer, when ``with_t5`` is false; the pipeline
    then feeds zeros in its place), a 16-channel VAE with SD3's shift and scale, and a 2-layer
    MMDiT on 2x2 patches.

    diffusers only loads a folder saved without T5 when told so:
    ``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``. The
    pipeline pads T5 prompts to its ``max_sequence_length`` (256 unless passed), not to the
    tokenizer's ``model_max_length``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

    sizes = TinySizes()
    folder = Path(folder)
    words = words or []
    hidden, projection_dim, t5_width = 16, 16, 32
    heads, head_dim = 4, 8
    tokenizer = _clip_tokenizer(folder / "tokenizer", words, sizes.max_tokens)
    tokenizer_2 = _clip_tokenizer(folder / "tokenizer_2", words, sizes.max_tokens, pad_token="!")
    tokenizer_3 = None
    if with_t5:
        write_t5_tokenizer(folder / "tokenizer_3", words, sizes.max_tokens)
        tokenizer_3 = T5TokenizerFast.from_pretrained(folder / "tokenizer_3")
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = (
        CLIPTextModelWithProjection(
            _clip_text_config(tok, hidden, 2, sizes.text_layers, act, projection_dim=projection_dim)
        )
        for tok, act in ((tokenizer, "quick_gelu"), (tokenizer_2, "gelu"))
    )
    text_encoder_3 = None
    if tokenizer_3 is not None:
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3), d_model=t5_width, d_kv=8, d_ff=t5_width * 2, num_layers=2,
                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu", pad_token_id=tokenizer_3.pad_token_id,
                eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=tokenizer_3.pad_token_id,
            )
        )  # T5 v1.1's gated-gelu feed-forward, as in SD3's T5-XXL
    transformer = SD3Transformer2DModel(
        sample_size=sizes.sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_width,
        caption_projection_dim=heads * head_dim,  # the text stream runs at the image stream's width
        pooled_projection_dim=2 * projection_dim,
        pos_embed_max_size=sizes.sample_size,  # counted in patches: latents up to 2x the configured side
    )
    vae = _tiny_vae(
        sizes, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


# --- full-size architectures with random weights (benchmarks: real shapes, no download) ---


def build_sd15_architecture(folder: Path, words: list[str] | None = None, seed: int = 0):
    """A random-weight pipeline with exactly Stable Diffusion 1.5's architecture (the 860 M-parameter
    UNet, the 84 M VAE, CLIP ViT-L/14's text transformer, its PNDM noise schedule); only the
    tokenizer's vocabulary is the small one ``write_tokenizer`` writes (so the text encoder has 85 M
    parameters instead of 123 M: CLIP's 49 k-token embedding is left out), padded to 77 tokens."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer = _clip_tokenizer(folder / "tokenizer", words or [], 77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # SD1.5's unet/config.json
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(  # SD1.5's vae/config.json
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_config = CLIPTextConfig(  # CLIP ViT-L/14's text tower, with the small vocabulary
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_tiny_dino(folder: str | Path, seed: int = 0) -> Path:
    """A random-weight DINOv2 (``Dinov2Model``) with tiny dimensions and its image processor, saved as
    a local folder that ``evaluation.dino_model`` can name (tests: DINO and drift metrics offline)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8,
    )
    Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    processor = BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(folder)
    return folder
