"""CLIP embeddings, CLIPScore and zero-shot classification for the quality metrics.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision".
Images are prepared by transformers' ``CLIPImageProcessor`` with the model's own
``preprocessor_config.json`` (OpenAI's values for a folder without one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtune.errors import one_line
from sdtune.metrics import maths
from sdtune.metrics.errors import MetricUnavailable

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _features(output: Any) -> torch.Tensor:
    """CLIP's projected features: transformers 4 returns the tensor, 5 an output whose pooler_output it is."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()


def image_processor(name_or_path: str | None, image_size: int) -> Any:
    """The model's ``CLIPImageProcessor``; without a preprocessor config, OpenAI CLIP's settings
    (bicubic resize of the short side and centre crop to ``image_size``, OpenAI mean/std)."""
    import transformers

    # the PIL implementation where transformers has one (≥ 5: the default one needs torchvision)
    CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor  # noqa: N806
    if name_or_path is not None:
        try:
            return CLIPImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError):
            pass
    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )


class ClipScorer:
    """A CLIP model and tokenizer, with the embeddings and scores the metrics need.

    Build one with :meth:`load` (a hub id or local folder), or directly from a loaded
    ``transformers.CLIPModel``, its tokenizer and its image processor. Every method runs in batches of ``batch_size``
    under :func:`torch.no_grad` on ``device`` (default: wherever the model already is).
    """

    def __init__(
        self,
        model,
        tokenizer,
        processor: Any = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = tokenizer
        self.processor = processor or image_processor(None, model.config.vision_config.image_size)
        self.batch_size = batch_size

    @classmethod
    def load(
        cls, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 32,
        setting: str = "evaluation.clip_model",
    ) -> ClipScorer:
        """Load a CLIP model, its tokenizer and its preprocessing values from a hub id or a local folder.

        Raises :class:`MetricUnavailable` with a one-line message when the model cannot be had.
        """
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as error:  # any failure means: this model cannot be had here
            where = "" if Path(name_or_path).expanduser().is_dir() else " (and no local folder of that name)"
            raise MetricUnavailable(
                f"CLIP model {name_or_path!r} could not be loaded{where}: {one_line(error)}; "
                "download it once where there is network (`hf download REPO_ID --local-dir DIR`) and set "
                f"{setting} to that folder"
            ) from error
        processor = image_processor(name_or_path, model.config.vision_config.image_size)
        return cls(model, tokenizer, processor, device=device, batch_size=batch_size)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images → normalised ``(n, 3, size, size)`` pixel tensor on the model's device and dtype."""
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return pixels["pixel_values"].to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings, shape ``(len(images), projection_dim)``."""
        if len(images) == 0:
            raise ValueError("image_embeddings: no images")
        chunks = []
        for batch in _batches(list(images), self.batch_size):
            chunks.append(_unit_rows(_features(self.model.get_image_features(pixel_values=self.preprocess(batch)))))
        return np.concatenate(chunks)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings, shape ``(len(texts), projection_dim)``; long texts are truncated."""
        if len(texts) == 0:
            raise ValueError("text_embeddings: no texts")
        max_length = min(
            self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings
        )
        chunks = []
        for batch in _batches(list(texts), self.batch_size):
            tokens = self.tokenizer(
                list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(self.device)
            features = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            chunks.append(_unit_rows(_features(features)))
        return np.concatenate(chunks)

    @property
    def logit_scale(self) -> float:
        """The model's learned temperature, exp(logit_scale) (100 for OpenAI's CLIPs)."""
        return float(self.model.logit_scale.detach().exp())

    def clip_score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """CLIPScore of each image with its prompt: ``100 · max(cos, 0)``, in [0, 100].

        Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", with
        the weight w = 100 used by torchmetrics' ``CLIPScore`` (see :func:`maths.clip_scores`).
        """
        if len(images) != len(prompts):
            raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
        return maths.clip_scores(self.image_embeddings(images), self.text_embeddings(prompts))

    def zero_shot(
        self, images: Sequence[Image.Image], labels: Sequence[str], template: str = "a {} image"
    ) -> np.ndarray:
        """Zero-shot class probabilities, shape ``(len(images), len(labels))``; rows sum to 1.

        Radford et al. 2021: softmax over ``logit_scale · cos(image, text)``, one text a label made
        with ``template.format(label)`` (see :func:`maths.zero_shot_probabilities`).
        """
        if len(labels) == 0:
            raise ValueError("zero_shot: no labels")
        texts = self.text_embeddings([template.format(label) for label in labels])
        return maths.zero_shot_probabilities(self.image_embeddings(images), texts, self.logit_scale)
