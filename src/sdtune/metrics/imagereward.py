"""ImageReward scores through the ``image-reward`` package (the ``imagereward`` extra).

Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation": a BLIP image-text encoder (the prompt's tokens cross-attend to the ViT image tokens)
and an MLP head on the [CLS] feature, normalised by the training set's mean and standard deviation,
so 0 is an average image and higher is preferred. The model, its preprocessing and its tokenizer are
the package's own (THUDM/ImageReward ``ImageReward/utils.py`` ``load`` and
``ImageReward/ImageReward.py`` ``ImageReward.score``); this module only loads it, turns every way it
can fail into :class:`MetricUnavailable`, and scores each image with its own prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtune.errors import one_line
from sdtune.metrics.errors import MetricUnavailable

EXTRA = "imagereward"  # the pyproject extra that installs the package
CHECKPOINT = "ImageReward.pt"  # the file names in the THUDM/ImageReward hub repository
MED_CONFIG = "med_config.json"
HOW_TO_GET = (
    "download ImageReward.pt and med_config.json from the hub repository THUDM/ImageReward once where "
    "there is network (`hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir DIR`) and "
    "set evaluation.imagereward_model to that folder"
)


def checkpoint_files(name_or_path: str) -> tuple[str, str | None]:
    """What to pass to ``ImageReward.load``: ``(name or checkpoint file, med_config file or None)``.

    A folder means its ``ImageReward.pt`` and ``med_config.json``; a checkpoint file takes the
    ``med_config.json`` beside it when there is one; anything else (a name such as
    ``ImageReward-v1.0``) goes to the package as it is, which downloads what it needs.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path / CHECKPOINT), str(path / MED_CONFIG)
    if path.is_file():
        beside = path.parent / MED_CONFIG
        return str(path), str(beside) if beside.is_file() else None
    return name_or_path, None


class ImageRewardScorer:
    """A loaded ImageReward model; :meth:`scores` gives one reward per (image, prompt) pair.

    ``model`` is what ``ImageReward.load`` returns, or anything with its ``score(prompt, images)``
    (a list of images of one prompt → a list of rewards; a list of one image → one float).
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu") -> ImageRewardScorer:
        """Load ``name_or_path`` (a folder, a checkpoint file or a package model name) with the package.

        Raises :class:`MetricUnavailable` with one line when the package cannot be imported (not
        installed, or not working with the installed transformers/torchvision) or the weights
        cannot be had.
        """
        try:
            import ImageReward as image_reward
        except Exception as error:  # ImportError, or the package's own imports failing (e.g. RuntimeError)
            raise MetricUnavailable(
                f"imagereward needs the image-reward package, which cannot be imported here ({one_line(error)}); "
                f"install it with `pip install 'sdtune[{EXTRA}]'`"
            ) from error
        checkpoint, med_config = checkpoint_files(name_or_path)
        try:
            model = image_reward.load(checkpoint, device=str(device), med_config=med_config)
        except Exception as error:  # any failure means: these weights cannot be had here
            raise MetricUnavailable(
                f"ImageReward model {name_or_path!r} could not be loaded: {one_line(error)}; {HOW_TO_GET}"
            ) from error
        return cls(model)

    @torch.no_grad()  # the package's list scoring keeps autograd on
    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """The reward of ``images[i]`` for ``prompts[i]``, shape ``(len(images),)``; the images of one
        prompt are scored in one call, as the package's ``score(prompt, images)`` takes them."""
        if len(images) != len(prompts):
            raise ValueError(f"ImageRewardScorer.scores: {len(images)} images but {len(prompts)} prompts")
        rows: dict[str, list[int]] = {}
        for row, prompt in enumerate(prompts):
            rows.setdefault(prompt, []).append(row)
        result = np.empty(len(images))
        for prompt, positions in rows.items():
            rewards = self.model.score(prompt, [images[row].convert("RGB") for row in positions])
            # the package squeezes its (n, 1) rewards: a single image comes back as one float
            result[positions] = np.atleast_1d(np.asarray(rewards, dtype=float))
        return result
