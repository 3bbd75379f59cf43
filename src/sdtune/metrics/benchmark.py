"""The metrics published fine-tuning benchmarks report, named as their papers name them.

- DreamBench (Ruiz et al. 2023, "DreamBooth"): **DINO** — mean pairwise cosine between DINO
  embeddings of generated and real images (here DINOv2, as the peft image-generation benchmark
  uses); **CLIP-I** — the same with CLIP image embeddings; **CLIP-T** — mean cosine between an
  image's CLIP embedding and its prompt's. Real images are the held-out validation images when the
  experiment has ``data.validation`` (else training images; ``details.reference_set`` says which);
  DINO and CLIP-I use the in-domain prompts' images.
- **drift** (peft ``method_comparison/image-gen``): ``(1 − cos(base, tuned)) / 2`` between DINOv2
  embeddings of the base and the fine-tuned model's images of unrelated (out-of-domain) prompts at
  the same seed; 0 = unchanged, 0.5 = orthogonal.
- Human-preference scorers, each an opt-in plug-in that runs only where ``evaluation.metrics``
  names it and is skipped with one line where its weights (or its package) cannot be had:
  **PickScore** (Kirstain et al. 2023) and **HPS v2** (Wu et al. 2023), both CLIP models fine-tuned
  on human choices (``evaluation.pickscore_model``, ``evaluation.hpsv2_model``: a hub id or a local
  folder in transformers' CLIPModel format); **ImageReward** (Xu et al. 2023), a BLIP encoder with a
  reward head, through the ``image-reward`` package (``evaluation.imagereward_model``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdtune.metrics import maths
from sdtune.metrics.errors import MetricUnavailable
from sdtune.metrics.registry import MetricContext, in_domain_rows, register_metric, with_ci

PICKSCORE = "pickscore"
HPSV2 = "hpsv2"
IMAGEREWARD = "imagereward"
# HPS v2's benchmark reports 100 · cos(image, prompt) (tgxs002/HPSv2 hpsv2/evaluation.py; its
# score() returns the bare cosine), not the model's own logit_scale · cos
HPS_SCALE = 100.0


def _references(ctx: MetricContext, encoder: str) -> np.ndarray:
    if not ctx.training_images:
        raise MetricUnavailable("no real reference images (set data.validation to hold some out)")
    return ctx.embeddings("training", encoder)


def _subject_fidelity(ctx: MetricContext, encoder: str) -> dict[str, Any]:
    generated = ctx.embeddings("generated", encoder)[in_domain_rows(ctx)]
    per_image = maths.cosine_matrix(generated, _references(ctx, encoder)).mean(axis=1)
    result = with_ci(per_image, ctx.seed)
    result["reference_set"] = ctx.reference_set
    return result


@register_metric("dino", direction="higher", needs="dino")
def dino_metric(ctx: MetricContext) -> dict[str, Any]:
    """DINO (DreamBench): mean pairwise DINOv2 cosine of in-domain generated to real reference images."""
    return _subject_fidelity(ctx, "dino")


@register_metric("clip_i", direction="higher", needs="clip")
def clip_i_metric(ctx: MetricContext) -> dict[str, Any]:
    """CLIP-I (DreamBench): mean pairwise CLIP image cosine of in-domain generated to real reference images."""
    return _subject_fidelity(ctx, "clip")


@register_metric("clip_t", direction="higher", needs="clip")
def clip_t_metric(ctx: MetricContext) -> dict[str, Any]:
    """CLIP-T (DreamBench): mean cosine between each image's and its prompt's CLIP embeddings."""
    unique = list(dict.fromkeys(ctx.prompts))
    texts = ctx.clip.text_embeddings(unique)[[unique.index(prompt) for prompt in ctx.prompts]]
    cosines = np.sum(ctx.embeddings("generated") * texts, axis=1)
    return with_ci(cosines, ctx.seed)


@register_metric("drift", direction="lower", needs="dino")
def drift_metric(ctx: MetricContext) -> dict[str, Any]:
    """Drift (peft image-gen): (1 − DINOv2 cosine of base and tuned images) / 2, out-of-domain prompts."""
    if ctx.base_images is None:
        raise MetricUnavailable("no base-model images to compare with (expected for the base model's own row)")
    rows = ctx.indices(in_domain=False)
    if len(rows) == 0:
        raise MetricUnavailable("no out-of-domain prompts; add some (evaluation.out_of_domain_prompts)")
    cosines = np.sum(ctx.embeddings("generated", "dino")[rows] * ctx.embeddings("base", "dino")[rows], axis=1)
    return with_ci(maths.drift(cosines), ctx.seed)


def _prompt_cosines(ctx: MetricContext, encoder: str) -> np.ndarray:
    """cos(image i, prompt i) under the CLIP-type ``encoder``, one per generated image."""
    unique = list(dict.fromkeys(ctx.prompts))
    texts = ctx.encoder(encoder).text_embeddings(unique)[[unique.index(prompt) for prompt in ctx.prompts]]
    return np.sum(ctx.embeddings("generated", encoder) * texts, axis=1)


@register_metric(PICKSCORE, direction="higher", needs=PICKSCORE, default=False)
def pickscore_metric(ctx: MetricContext) -> dict[str, Any]:
    """PickScore (Kirstain et al. 2023): the preference model's logit_scale · cos(image, prompt)."""
    return with_ci(ctx.encoder(PICKSCORE).logit_scale * _prompt_cosines(ctx, PICKSCORE), ctx.seed)


@register_metric(HPSV2, direction="higher", needs=HPSV2, default=False)
def hpsv2_metric(ctx: MetricContext) -> dict[str, Any]:
    """HPS v2 (Wu et al. 2023): 100 · cos(image, prompt) under the preference-tuned CLIP, as its benchmark."""
    return with_ci(HPS_SCALE * _prompt_cosines(ctx, HPSV2), ctx.seed)


@register_metric(IMAGEREWARD, direction="higher", needs=IMAGEREWARD, default=False)
def imagereward_metric(ctx: MetricContext) -> dict[str, Any]:
    """ImageReward (Xu et al. 2023): the reward model's normalised score of each image for its prompt."""
    return with_ci(ctx.encoder(IMAGEREWARD).scores(ctx.images, ctx.prompts), ctx.seed)
