"""Quality metrics for comparing fine-tuned models: CLIP-based scores and the maths behind them.

- :mod:`sdtune.metrics.maths`: pure functions on embedding arrays (cosine fidelity, Vendi, Fréchet
  distance, KID, bootstrap confidence intervals, style shares).
- :mod:`sdtune.metrics.clip`: :class:`ClipScorer`, CLIP embeddings / CLIPScore / zero-shot.
- :mod:`sdtune.metrics.dino`: :class:`DinoEncoder`, DINOv2 embeddings.
- :mod:`sdtune.metrics.imagereward`: :class:`ImageRewardScorer`, through the ``image-reward`` package.
- :mod:`sdtune.metrics.benchmark`: the benchmark metrics (DINO, CLIP-I, CLIP-T, drift) and the
  opt-in human-preference scorers (PickScore, HPS v2, ImageReward).
- :mod:`sdtune.metrics.registry`: the metric plug-in registry, :class:`MetricContext` and
  :func:`compute_all`. FID and KID here use CLIP features, not Inception ones.
"""

from sdtune.metrics import benchmark as _benchmark  # noqa: F401  (registers the benchmark metrics)
from sdtune.metrics.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipScorer
from sdtune.metrics.dino import DinoEncoder
from sdtune.metrics.errors import MetricUnavailable
from sdtune.metrics.imagereward import ImageRewardScorer
from sdtune.metrics.maths import (
    bootstrap_ci,
    centroid_distance,
    clip_scores,
    cosine_matrix,
    drift,
    fidelity,
    frechet_distance,
    kid,
    mean_max_cosine,
    normalize,
    style_shares,
    vendi_score,
    zero_shot_probabilities,
)
from sdtune.metrics.registry import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_STYLE_LABELS,
    DIRECTIONS,
    ENCODERS,
    METRICS,
    Metric,
    MetricContext,
    compute_all,
    default_metric_names,
    load_plugins,
    register_metric,
)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_STYLE_LABELS",
    "DIRECTIONS",
    "ENCODERS",
    "METRICS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipScorer",
    "DinoEncoder",
    "ImageRewardScorer",
    "Metric",
    "MetricContext",
    "MetricUnavailable",
    "bootstrap_ci",
    "centroid_distance",
    "clip_scores",
    "compute_all",
    "default_metric_names",
    "load_plugins",
    "cosine_matrix",
    "drift",
    "fidelity",
    "frechet_distance",
    "kid",
    "mean_max_cosine",
    "normalize",
    "register_metric",
    "style_shares",
    "vendi_score",
    "zero_shot_probabilities",
]
