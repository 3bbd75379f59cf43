"""The model-family interface and the loaded bundle of parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sdtune.registry import Registry

if TYPE_CHECKING:
    from sdtune.config import ModelConfig


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says what was tried and how to fix it."""


@dataclass
class ModelBundle:
    """The loaded parts of a text-to-image model, as the training loop uses them."""

    family: ModelFamily
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_scheduler: Any  # a DDPMScheduler built from the model's scheduler config
    inference_scheduler: Any  # the scheduler the model ships for sampling
    source: str  # where it was loaded from (path or hub id)


class ModelFamily:
    """How one family of models (SD1.x, SD2.x, SDXL, …) is loaded and fed."""

    name: ClassVar[str]

    def load(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> ModelBundle:
        raise NotImplementedError

    def tokenize(self, bundle: ModelBundle, captions: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, bundle: ModelBundle, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, bundle: ModelBundle, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior (mean, std) of pixels in [-1, 1], without gradients."""
        raise NotImplementedError

    def latent_scale(self, bundle: ModelBundle) -> float:
        raise NotImplementedError

    def pipeline_class(self) -> Any:
        """The diffusers pipeline class (for from_pretrained, save/load_lora_weights)."""
        raise NotImplementedError

    def build_pipeline(self, bundle: ModelBundle) -> Any:
        raise NotImplementedError

    def load_pipeline(self, path: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
        raise NotImplementedError

    def detects(self, config: ModelConfig) -> bool:
        """True when this family can load the model (used by ``family: auto``)."""
        raise NotImplementedError


FAMILIES: Registry[type[ModelFamily]] = Registry("model family")


def family_for(config: ModelConfig) -> ModelFamily:
    """The family named in the config, or the first registered one that detects the model."""
    if config.family != "auto":
        return FAMILIES.get(config.family)()
    for name in FAMILIES:
        family = FAMILIES.get(name)()
        if family.detects(config):
            return family
    raise ModelLoadError(
        f"model {config.path!r}: no registered family recognises it; set model.family to one of: "
        f"{', '.join(FAMILIES.names())}"
    )
