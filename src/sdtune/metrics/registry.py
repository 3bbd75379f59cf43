"""A plug-in registry of quality metrics, the context they read, and :func:`compute_all`.

A metric is a function ``compute(ctx) -> dict`` registered with :func:`register_metric` under a
name, a direction ("higher" or "lower" is better, or "none" for informational results) and the
model it needs. The dict holds the headline number under ``"value"`` and any extra numbers beside
it; :func:`compute_all` reports the extras as ``"details"``.

The metrics here use CLIP (Radford et al. 2021) or DINOv2 (Oquab et al. 2023) image embeddings, or
a human-preference model (PickScore, HPS v2, ImageReward), loaded on first use by the context from
the model named in the experiment. In particular ``fid`` and
``kid`` are CLIP-feature FID/KID, *not* the usual Inception-v3 FID/KID: Inception weights cannot be
had offline, so the numbers are only comparable with each other, never with published FIDs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from sdtune.metrics import maths
from sdtune.metrics.clip import ClipScorer
from sdtune.metrics.dino import DinoEncoder
from sdtune.metrics.errors import MetricUnavailable
from sdtune.metrics.imagereward import ImageRewardScorer
from sdtune.util.device import default_device
from sdtune.util.registry import Registry

logger = logging.getLogger(__name__)

DIRECTIONS = ("higher", "lower", "none")
DEFAULT_STYLE_LABELS = ("realistic", "semi-cartoon", "cartoon")
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dinov2-small"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_HPSV2_MODEL = "adams-story/HPSv2-hf"  # a third-party transformers conversion of HPS v2.0
DEFAULT_IMAGEREWARD_MODEL = "ImageReward-v1.0"  # the image-reward package's name for THUDM/ImageReward
IMAGE_SETS = {"generated": "images", "training": "training_images", "base": "base_images"}  # → field


@dataclass(frozen=True)
class Metric:
    """One registered metric (see :func:`register_metric`)."""

    name: str
    direction: str  # "higher" or "lower" is better, "none" = informational
    needs: str | None  # the encoder it needs ("clip", "dino", …: a key of ENCODERS), or None
    compute: Callable[[MetricContext], dict[str, Any]]
    description: str = ""
    default: bool = True  # run when an experiment names no metrics (False: only when named)


METRICS: Registry[Metric] = Registry("metric")


def _load_clip(model: str, device: str, batch_size: int) -> ClipScorer:
    return ClipScorer.load(model, device=device, batch_size=batch_size)


def _load_dino(model: str, device: str, batch_size: int) -> DinoEncoder:
    return DinoEncoder.load(model, device=device, batch_size=batch_size)


# encoder name → loader(model name or folder, device, batch size); plug-ins may add their own and
# pass the loader through MetricContext.loaders
def _load_pickscore(model: str, device: str, batch_size: int) -> ClipScorer:
    # PickScore is a CLIP model fine-tuned on human preferences (Kirstain et al. 2023)
    return ClipScorer.load(model, device=device, batch_size=batch_size, setting="evaluation.pickscore_model")


def _load_hpsv2(model: str, device: str, batch_size: int) -> ClipScorer:
    # HPS v2 is OpenCLIP ViT-H/14 fine-tuned on human preferences (Wu et al. 2023), here in
    # transformers' CLIPModel format
    return ClipScorer.load(model, device=device, batch_size=batch_size, setting="evaluation.hpsv2_model")


def _load_imagereward(model: str, device: str, batch_size: int) -> ImageRewardScorer:
    return ImageRewardScorer.load(model, device=device)  # the package scores one image at a time


# a context reads the model of encoder NAME from its field NAME_model (None where it has none)
ENCODERS: dict[str, Callable[[str, str, int], Any]] = {
    "clip": _load_clip, "dino": _load_dino, "pickscore": _load_pickscore, "hpsv2": _load_hpsv2,
    "imagereward": _load_imagereward,
}


def register_metric(
    name: str, direction: str, needs: str | None = None, registry: Registry[Metric] | None = None,
    default: bool = True,
):
    """Decorator registering ``compute(ctx) -> dict`` as a metric in ``registry`` (default :data:`METRICS`).

    Duplicate names are rejected. ``compute`` returns the headline number under ``"value"``. A
    metric with ``default=False`` runs only where an experiment names it (``evaluation.metrics``).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"metric {name!r}: direction must be one of {DIRECTIONS}, got {direction!r}")

    def add(compute: Callable[[MetricContext], dict[str, Any]]):
        summary = (compute.__doc__ or "").strip().split("\n")[0]
        (METRICS if registry is None else registry).register(name)(
            Metric(name, direction, needs, compute, summary, default)
        )
        return compute

    return add


def default_metric_names(registry: Registry[Metric] | None = None) -> list[str]:
    """The metrics an experiment that names none gets: every registered one marked ``default``."""
    registry = METRICS if registry is None else registry
    return [name for name in registry.names() if registry.get(name).default]


def load_plugins(modules: Sequence[str]) -> None:
    """Import the named modules, which register their own metrics (``evaluation.metric_plugins``)."""
    import importlib

    from sdtune.config.schema import ConfigError

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(
                f"evaluation.metric_plugins: {module!r} cannot be imported ({error}); give an importable "
                "module that registers metrics, e.g. sdtune.demo.metrics"
            ) from None



@dataclass
class MetricContext:
    """Everything the metrics read for one row of the comparison (one model or technique).

    ``images[i]`` was generated from ``prompts[i]`` with ``seeds[i]``; ``in_domain[i]`` says whether
    that prompt is in the training domain (default: all are). ``base_images[i]``, when given, is the
    base model's image at the same prompt and seed (None for the base model's own row).
    ``training_images`` are the real reference images: the held-out validation images when the
    experiment has ``data.validation`` (``reference_set`` says which). Encoders (``"clip"``,
    ``"dino"``, …) are loaded on first use by ``loaders[name]`` (default: the :data:`ENCODERS`
    entry with the model named here); embeddings and :meth:`cached` values are computed once.
    """

    images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]
    training_images: list[Image.Image]
    in_domain: list[bool] | None = None
    base_images: list[Image.Image] | None = None
    style_labels: list[str] = field(default_factory=lambda: list(DEFAULT_STYLE_LABELS))
    style_template: str = "a {} image"
    clip_model: str = DEFAULT_CLIP_MODEL
    device: str | None = None  # None = CUDA when available, else CPU
    clip_loader: Callable[[], ClipScorer] | None = None
    dino_model: str = DEFAULT_DINO_MODEL
    pickscore_model: str = DEFAULT_PICKSCORE_MODEL
    hpsv2_model: str = DEFAULT_HPSV2_MODEL
    imagereward_model: str = DEFAULT_IMAGEREWARD_MODEL
    loaders: dict[str, Callable[[], Any]] = field(default_factory=dict)  # encoder name → loader
    reference_set: str = "training"  # "validation" when the references are held-out images
    batch_size: int = 32
    seed: int = 0  # for bootstrap resampling and KID subsets
    _encoders: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _encoder_errors: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _embeddings: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.in_domain is None:
            self.in_domain = [True] * len(self.images)
        for name in ("prompts", "seeds", "in_domain"):
            if len(getattr(self, name)) != len(self.images):
                raise ValueError(
                    f"MetricContext: {len(self.images)} images but {len(getattr(self, name))} {name}"
                )
        if self.base_images is not None and len(self.base_images) != len(self.images):
            raise ValueError(
                f"MetricContext: {len(self.images)} images but {len(self.base_images)} base_images"
            )
        if not self.images:
            raise ValueError("MetricContext: no generated images")

    @property
    def clip(self) -> ClipScorer:
        """The CLIP scorer, loaded on first use; raises :class:`MetricUnavailable` if it cannot be."""
        return self.encoder("clip")

    def encoder(self, name: str) -> Any:
        """The encoder ``name`` (loaded once); :class:`MetricUnavailable` if it cannot be had."""
        if name not in self._encoders:
            if name in self._encoder_errors:
                raise MetricUnavailable(self._encoder_errors[name])
            try:
                self._encoders[name] = self._loader(name)()
            except MetricUnavailable as error:
                self._encoder_errors[name] = str(error)
                raise
        return self._encoders[name]

    def _loader(self, name: str) -> Callable[[], Any]:
        if name in self.loaders:
            return self.loaders[name]
        if name == "clip" and self.clip_loader is not None:
            return self.clip_loader
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}")
        model = getattr(self, f"{name}_model", None)
        device = self.device or str(default_device())
        return lambda: ENCODERS[name](model, device, self.batch_size)

    def require(self, need: str | None) -> Any:
        """The encoder a metric ``needs`` (None: nothing); :class:`MetricUnavailable` if it cannot be had."""
        return None if need is None else self.encoder(need)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per context under ``key`` (e.g. a plug-in's per-image analysis)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def embeddings(self, which: str, encoder: str = "clip") -> np.ndarray:
        """Unit image embeddings of the ``"generated"``, ``"training"`` or ``"base"`` images (cached)."""
        if which not in IMAGE_SETS:
            raise ValueError(f"unknown image set {which!r}; choose one of: {', '.join(IMAGE_SETS)}")
        if (which, encoder) not in self._embeddings:
            images = getattr(self, IMAGE_SETS[which])
            if not images:
                raise MetricUnavailable(f"no {which} images were given")
            self._embeddings[which, encoder] = self.encoder(encoder).image_embeddings(images)
        return self._embeddings[which, encoder]

    def indices(self, in_domain: bool) -> np.ndarray:
        """Positions of the in-domain (True) or out-of-domain (False) generated images."""
        return np.flatnonzero(np.asarray(self.in_domain, dtype=bool) == in_domain)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays → Python floats/lists, recursively (so results serialise to JSON)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    return value


def _run(metric: Metric, ctx: MetricContext) -> dict[str, Any]:
    entry: dict[str, Any] = {"value": None, "direction": metric.direction, "skipped": None, "details": {}}
    try:
        ctx.require(metric.needs)
        result = dict(metric.compute(ctx))
    except MetricUnavailable as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        logger.warning("metric %r skipped: %s", metric.name, reason)
        entry["skipped"] = reason
        return entry
    entry["value"] = _plain(result.pop("value"))
    entry["details"] = _plain(result)
    return entry


def compute_all(
    ctx: MetricContext, names: Sequence[str] | None = None, registry: Registry[Metric] | None = None
) -> dict[str, dict[str, Any]]:
    """Run the named metrics (default: all registered in ``registry``, default :data:`METRICS`) on ``ctx``.

    Returns ``{name: {"value", "direction", "skipped", "details"}}``. A metric that raises
    :class:`MetricUnavailable` gets ``value`` None and ``skipped`` set to the one-line reason (and a
    logged warning); other errors propagate. Unknown names raise ``RegistryError`` listing the
    registered ones, before anything is computed.
    """
    registry = METRICS if registry is None else registry
    chosen = [registry.get(name) for name in dict.fromkeys(registry.names() if names is None else names)]
    return {metric.name: _run(metric, ctx) for metric in chosen}


# --------------------------------------------------------------------------- the metrics


def with_ci(values: np.ndarray, seed: int) -> dict[str, Any]:
    mean, low, high = maths.bootstrap_ci(values, seed=seed)
    return {"value": mean, "ci_low": low, "ci_high": high, "n": len(values)}


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def in_domain_rows(ctx: MetricContext, minimum: int = 1) -> np.ndarray:
    """Positions of the in-domain generated images; MetricUnavailable when there are fewer than ``minimum``."""
    rows = ctx.indices(in_domain=True)
    if len(rows) < minimum:
        raise MetricUnavailable(f"needs at least {minimum} in-domain generated images, got {len(rows)}")
    return rows


def _in_domain_generated(ctx: MetricContext, minimum: int = 1) -> np.ndarray:
    return ctx.embeddings("generated")[in_domain_rows(ctx, minimum)]


def _training(ctx: MetricContext, minimum: int = 1) -> np.ndarray:
    if len(ctx.training_images) < minimum:
        raise MetricUnavailable(f"needs at least {minimum} training images, got {len(ctx.training_images)}")
    return ctx.embeddings("training")


@register_metric("clip_score", direction="higher", needs="clip")
def clip_score_metric(ctx: MetricContext) -> dict[str, Any]:
    """Prompt alignment: mean CLIPScore (Hessel et al. 2021, w = 100) of every image with its prompt."""
    unique = list(dict.fromkeys(ctx.prompts))
    texts = ctx.clip.text_embeddings(unique)
    text_rows = texts[[unique.index(prompt) for prompt in ctx.prompts]]
    scores = maths.clip_scores(ctx.embeddings("generated"), text_rows)
    result = with_ci(scores, ctx.seed)
    result["in_domain"] = _mean_or_none(scores[ctx.indices(True)])
    result["out_of_domain"] = _mean_or_none(scores[ctx.indices(False)])
    return result


@register_metric("style_split", direction="none", needs="clip")
def style_split_metric(ctx: MetricContext) -> dict[str, Any]:
    """Informational: share of images whose zero-shot CLIP style (Radford et al. 2021) is each label."""
    texts = ctx.clip.text_embeddings([ctx.style_template.format(label) for label in ctx.style_labels])
    probabilities = maths.zero_shot_probabilities(ctx.embeddings("generated"), texts, ctx.clip.logit_scale)
    winners = probabilities.argmax(axis=1)

    def shares(rows: np.ndarray) -> dict[str, float] | None:
        return maths.style_shares(winners[rows].tolist(), ctx.style_labels) if len(rows) else None

    return {
        "value": shares(np.arange(len(winners))),
        "in_domain": shares(ctx.indices(True)),
        "out_of_domain": shares(ctx.indices(False)),
        "mean_probability": dict(zip(ctx.style_labels, probabilities.mean(axis=0))),
    }


@register_metric("fidelity", direction="higher", needs="clip")
def fidelity_metric(ctx: MetricContext) -> dict[str, Any]:
    """Closeness to the training set: mean cosine of in-domain generated to training image embeddings."""
    generated, training = _in_domain_generated(ctx), _training(ctx)
    per_image = maths.cosine_matrix(generated, training).mean(axis=1)
    result = with_ci(per_image, ctx.seed)
    result["nearest_neighbour"] = maths.mean_max_cosine(generated, training)
    result["centroid_distance"] = maths.centroid_distance(generated, training)
    return result


def _per_prompt_vendi(ctx: MetricContext, embeddings: np.ndarray) -> float | None:
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(ctx.prompts):
        groups.setdefault(prompt, []).append(row)
    scores = [maths.vendi_score(embeddings[rows]) for rows in groups.values() if len(rows) > 1]
    return float(np.mean(scores)) if scores else None


@register_metric("diversity", direction="higher", needs="clip")
def diversity_metric(ctx: MetricContext) -> dict[str, Any]:
    """Vendi score (Friedman & Dieng 2023) of all generated images' CLIP embeddings."""
    generated = ctx.embeddings("generated")
    in_domain = ctx.indices(True)
    return {
        "value": maths.vendi_score(generated),
        "in_domain": maths.vendi_score(generated[in_domain]) if len(in_domain) else None,
        "per_prompt_mean": _per_prompt_vendi(ctx, generated),  # across seeds: low = mode collapse
        "training": maths.vendi_score(ctx.embeddings("training")) if ctx.training_images else None,
    }


@register_metric("preservation", direction="higher", needs="clip")
def preservation_metric(ctx: MetricContext) -> dict[str, Any]:
    """Prior preservation: mean cosine between base-model and fine-tuned images, out-of-domain prompts only.

    Pairs are the same prompt and seed (``base_images[i]`` ↔ ``images[i]``): 1 means fine-tuning left
    what the model draws outside its training domain unchanged.
    """
    if ctx.base_images is None:
        raise MetricUnavailable(
            "no base-model images to compare with (expected for the base model's own row)"
        )
    rows = ctx.indices(in_domain=False)
    if len(rows) == 0:
        raise MetricUnavailable("no out-of-domain prompts; add some (evaluation.out_of_domain_prompts)")
    pairs = np.sum(ctx.embeddings("generated")[rows] * ctx.embeddings("base")[rows], axis=1)
    return with_ci(pairs, ctx.seed)


@register_metric("fid", direction="lower", needs="clip")
def fid_metric(ctx: MetricContext) -> dict[str, Any]:
    """CLIP-feature FID (not Inception FID): Fréchet distance (Heusel et al. 2017), in-domain to training.

    Features are unit-norm CLIP image embeddings, because Inception-v3 weights cannot be had offline;
    values are comparable between rows of one comparison, not with published FIDs, and are biased
    upwards for small sets (compare only rows with the same numbers of images).
    """
    generated, training = _in_domain_generated(ctx, minimum=2), _training(ctx, minimum=2)
    value = maths.frechet_distance(generated, training)
    return {"value": value, "features": "clip", "n_generated": len(generated), "n_training": len(training)}


@register_metric("kid", direction="lower", needs="clip")
def kid_metric(ctx: MetricContext) -> dict[str, Any]:
    """CLIP-feature KID (not Inception KID; Bińkowski et al. 2018) of in-domain images to training.

    Features are unit-norm CLIP image embeddings scaled by √d, so that x·y/d in the cubic kernel is
    the cosine, the O(1) regime the kernel was designed for; Inception weights cannot be had offline.
    """
    generated, training = _in_domain_generated(ctx, minimum=2), _training(ctx, minimum=2)
    scale = np.sqrt(generated.shape[1])
    mean, std = maths.kid(generated * scale, training * scale, seed=ctx.seed)
    subset = min(1000, len(generated), len(training))
    return {"value": mean, "std": std, "subset_size": subset, "features": "clip"}
