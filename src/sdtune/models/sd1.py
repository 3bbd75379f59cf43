"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a 4-channel KL VAE, epsilon or v prediction.

SD2.x shares this architecture; its v-prediction comes from the scheduler config, which the loop
reads, so both load through this family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdtune.models.base import FAMILIES, ModelBundle, ModelFamily, ModelLoadError

if TYPE_CHECKING:
    from sdtune.config import ModelConfig

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@FAMILIES.register("sd1")
class StableDiffusion1(ModelFamily):
    name = "sd1"

    def detects(self, config: ModelConfig) -> bool:
        path = Path(config.path).expanduser()
        if path.is_file():
            return path.suffix in SINGLE_FILE_SUFFIXES
        index = path / "model_index.json"
        if index.exists():
            return json.loads(index.read_text()).get("_class_name") == "StableDiffusionPipeline"
        return not path.exists()  # a hub id: cannot be checked offline; SD1/2 is the default

    def load(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> ModelBundle:
        if Path(config.path).expanduser().is_file():
            pipe = self.load_pipeline(config.path, dtype, single_file_config=config.single_file_config)
            return self._bundle_from_pipeline(pipe, config.path)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        common = {"revision": config.revision}
        weights = {**common, "variant": config.variant}
        if dtype != torch.float32:
            weights["torch_dtype"] = dtype
        with _load_errors(config.path):
            tokenizer = CLIPTokenizer.from_pretrained(config.path, subfolder="tokenizer", **common)
            text_encoder = CLIPTextModel.from_pretrained(config.path, subfolder="text_encoder", **weights)
            vae = AutoencoderKL.from_pretrained(config.path, subfolder="vae", **weights)
            unet = UNet2DConditionModel.from_pretrained(config.path, subfolder="unet", **weights)
            noise_scheduler = DDPMScheduler.from_pretrained(config.path, subfolder="scheduler", **common)
            inference_scheduler = _scheduler_from_config(
                type(noise_scheduler).load_config(config.path, subfolder="scheduler", **common)
            )
        return ModelBundle(
            family=self,
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            noise_scheduler=noise_scheduler,
            inference_scheduler=inference_scheduler,
            source=config.path,
        )

    def _bundle_from_pipeline(self, pipe: Any, source: str) -> ModelBundle:
        from diffusers import DDPMScheduler

        return ModelBundle(
            family=self,
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            inference_scheduler=pipe.scheduler,
            source=source,
        )

    def tokenize(self, bundle: ModelBundle, captions: list[str]) -> torch.Tensor:
        tokens = bundle.tokenizer(
            captions,
            padding="max_length",
            max_length=bundle.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids

    def encode_text(self, bundle: ModelBundle, input_ids: torch.Tensor) -> torch.Tensor:
        return bundle.text_encoder(input_ids.to(bundle.text_encoder.device), return_dict=False)[0]

    @torch.no_grad()
    def encode_images(self, bundle: ModelBundle, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = bundle.vae.encode(pixels).latent_dist
        return posterior.mean, posterior.std

    def latent_scale(self, bundle: ModelBundle) -> float:
        return float(bundle.vae.config.scaling_factor)

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def build_pipeline(self, bundle: ModelBundle) -> Any:
        return self.pipeline_class()(
            vae=bundle.vae,
            text_encoder=bundle.text_encoder,
            tokenizer=bundle.tokenizer,
            unet=bundle.unet,
            scheduler=bundle.inference_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def load_pipeline(self, path: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
        pipeline_class = self.pipeline_class()
        single_file_config = kwargs.pop("single_file_config", None)
        options = {"safety_checker": None, "requires_safety_checker": False, **kwargs}
        if dtype != torch.float32:  # (the keyword was renamed across diffusers versions; fp32 is the default)
            options["torch_dtype"] = dtype
        with _load_errors(path):
            if Path(path).expanduser().is_file():
                if single_file_config:
                    options["config"] = single_file_config
                return pipeline_class.from_single_file(path, **options)
            return pipeline_class.from_pretrained(path, **options)


def _scheduler_from_config(config: dict[str, Any]) -> Any:
    import diffusers

    scheduler_cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
    return scheduler_cls.from_config(config)


class _load_errors:
    """Turn the many exceptions of hub/local loading into one clear line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, (OSError, ValueError, EnvironmentError, KeyError)):
            return False
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        local = Path(self.path).expanduser().exists()
        fix = (
            "check that the folder is a diffusers pipeline (model_index.json, unet/, vae/, text_encoder/, "
            "tokenizer/, scheduler/)"
            if local
            else "the hub may be unreachable: download the model and give its local folder, or a single "
            ".safetensors file with model.single_file_config"
        )
        raise ModelLoadError(f"could not load model {self.path!r}: {first_line[:300]}; {fix}") from exc
