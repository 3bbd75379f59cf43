"""The mathematics of the quality metrics: pure functions on arrays, no models, no I/O.

Inputs are 2-D arrays of shape ``(n, d)`` (one embedding or feature vector a row): numpy arrays,
anything :func:`numpy.asarray` accepts, or torch tensors (moved to the CPU). Computation is in
float64; results are plain Python floats.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
from scipy import linalg

_EPS = 1e-12


def _as_2d(x, name: str = "embeddings") -> np.ndarray:
    """``x`` as a float64 (n, d) array with n ≥ 1; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (n, d) array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def _same_width(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sets have different dimensions: {a.shape[1]} and {b.shape[1]}")


def normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    array = _as_2d(x)
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), _EPS)


def cosine_matrix(a, b) -> np.ndarray:
    """The ``(len(a), len(b))`` matrix of cosine similarities between the rows of ``a`` and ``b``.

    Cosine similarity of embeddings is the comparison CLIP is trained for (Radford et al. 2021,
    "Learning Transferable Visual Models From Natural Language Supervision").
    """
    a, b = normalize(a), normalize(b)
    _same_width(a, b)
    return a @ b.T


def fidelity(gen_emb, ref_emb) -> float:
    """Mean cosine similarity over all (generated, reference) pairs: how close, on average, the images
    are to the training set in embedding space.

    The embedding-similarity measure of subject/style fidelity used by DreamBooth (Ruiz et al. 2023,
    "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation", CLIP-I).
    Equal to the dot product of the two sets' mean unit embeddings, so it is 1 only when all
    embeddings point the same way; see :func:`mean_max_cosine` for the nearest-neighbour variant.
    """
    return float(cosine_matrix(gen_emb, ref_emb).mean())


def mean_max_cosine(gen_emb, ref_emb) -> float:
    """Mean over generated embeddings of the cosine to their nearest reference embedding.

    The nearest-neighbour variant of :func:`fidelity` (Ruiz et al. 2023, DreamBooth, CLIP-I): 1 when
    every generated image has an exact copy in the reference set, so high values can also mean
    memorisation of the training images.
    """
    return float(cosine_matrix(gen_emb, ref_emb).max(axis=1).mean())


def centroid_distance(a, b) -> float:
    """L2 distance between the means of the two sets' unit-normalised embeddings (0 for identical sets).

    The first-moment term of the Fréchet distance (Heusel et al. 2017) on normalised embeddings: how
    far the average image of one set is from the average image of the other.
    """
    a, b = normalize(a), normalize(b)
    _same_width(a, b)
    return float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)))


def vendi_score(embeddings) -> float:
    """The Vendi score: the effective number of distinct items in a set (between 1 and n).

    Friedman & Dieng 2023, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning":
    exp of the Shannon entropy of the eigenvalues of K/n, with K the cosine-similarity kernel
    (K_ii = 1). Identical copies score 1; n mutually orthogonal embeddings score n. The non-zero
    eigenvalues of X Xᵀ/n equal those of Xᵀ X/n, so the smaller of the two matrices is used.
    """
    x = normalize(embeddings)
    n = x.shape[0]
    gram = x @ x.T if n <= x.shape[1] else x.T @ x
    eigenvalues = np.clip(np.linalg.eigvalsh(gram / n), 0.0, None)
    eigenvalues = eigenvalues[eigenvalues > _EPS]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def _mean_and_covariance(feats: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    if feats.shape[0] < 2:
        raise ValueError(f"{name}: the Fréchet distance needs at least 2 samples, got {feats.shape[0]}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def _trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """tr(sqrtm(Σa Σb)), made robust the usual way: an ε·I offset when the product is too singular for
    :func:`scipy.linalg.sqrtm`, and dropping the round-off imaginary part."""
    with warnings.catch_warnings():  # small sets give singular covariances: handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.all(np.isfinite(root)):
        offset = np.eye(sigma_a.shape[0]) * 1e-6
        root = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(root):
        imaginary = np.max(np.abs(np.diagonal(root).imag))
        if imaginary > 1e-3 * max(1.0, np.max(np.abs(np.diagonal(root).real))):
            warnings.warn(f"frechet_distance: sqrtm has an imaginary part of {imaginary:.3g}", stacklevel=3)
        root = root.real
    return float(np.trace(root))


def frechet_distance(feats_a, feats_b) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (the "FD" of FID).

    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium": ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½). Works for sets smaller than the feature
    dimension (singular covariances) thanks to an ε offset, but with few samples the value is biased
    upwards and only comparable between sets of the same sizes. Round-off below 0 is clamped to 0.
    """
    a, b = _as_2d(feats_a, "feats_a"), _as_2d(feats_b, "feats_b")
    _same_width(a, b)
    mu_a, sigma_a = _mean_and_covariance(a, "feats_a")
    mu_b, sigma_b = _mean_and_covariance(b, "feats_b")
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * _trace_sqrt_product(sigma_a, sigma_b)
    return float(max(value, 0.0))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid(feats_a, feats_b, subset_size: int | None = None, num_subsets: int = 100, seed: int = 0):
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD² over random subsets.

    Bińkowski et al. 2018, "Demystifying MMD GANs": cubic polynomial kernel k(x, y) = (x·y/d + 1)³,
    unbiased MMD² estimator, averaged over ``num_subsets`` pairs of subsets of ``m`` rows each, drawn
    without replacement, with ``m = min(subset_size or 1000, len(a), len(b))``. Unbiased, so the
    value for two samples of one distribution is ≈ 0 and can be slightly negative.
    Returns ``(mean, std)``.
    """
    a, b = _as_2d(feats_a, "feats_a"), _as_2d(feats_b, "feats_b")
    _same_width(a, b)
    m = min(subset_size or 1000, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(
            f"kid: needs subsets of at least 2 rows, the sets have {a.shape[0]} and {b.shape[0]}"
        )
    if num_subsets < 1:
        raise ValueError(f"kid: num_subsets must be at least 1, got {num_subsets}")
    rng = np.random.default_rng(seed)
    values = [
        _unbiased_mmd2(
            a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)]
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def bootstrap_ci(values, confidence: float = 0.95, num_resamples: int = 1000, seed: int = 0):
    """Percentile bootstrap confidence interval of the mean: ``(mean, low, high)``, by
    :func:`scipy.stats.bootstrap` (Efron & Tibshirani 1993, "An Introduction to the Bootstrap",
    percentile interval). A single value gives (v, v, v); the interval always contains the mean."""
    import warnings

    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}")
    mean = float(data.mean())
    if data.size == 1:
        return mean, mean, mean
    with warnings.catch_warnings():  # identical values: a degenerate (zero-width) interval, as it should be
        warnings.simplefilter("ignore")
        interval = bootstrap(
            (data,), np.mean, confidence_level=confidence, n_resamples=num_resamples, method="percentile",
            rng=np.random.default_rng(seed), vectorized=True,
        ).confidence_interval
    return mean, float(min(interval.low, mean)), float(max(interval.high, mean))


def clip_scores(image_emb, text_emb) -> np.ndarray:
    """CLIPScore of each (image, text) row pair: ``100 · max(cos, 0)``, in [0, 100].

    Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", with
    the weight w = 100 used by torchmetrics' ``CLIPScore`` (the paper uses w = 2.5).
    """
    images, texts = normalize(image_emb), normalize(text_emb)
    _same_width(images, texts)
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"clip_scores: {images.shape[0]} image rows but {texts.shape[0]} text rows")
    return 100.0 * np.clip(np.sum(images * texts, axis=1), 0.0, None)


def zero_shot_probabilities(image_emb, text_emb, logit_scale: float) -> np.ndarray:
    """Zero-shot class probabilities: softmax over ``logit_scale · cos(image, class text)``; rows sum to 1.

    Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision".
    """
    logits = logit_scale * cosine_matrix(image_emb, text_emb)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def style_shares(labels: Sequence[str | int], classes: Sequence[str]) -> dict[str, float]:
    """The share of each class among ``labels`` (class names or indices into ``classes``), in class order.

    The shares sum to 1 (all 0 for no labels). Used on zero-shot CLIP classifications (Radford et al.
    2021) to report which style the generated images fall into.
    """
    names = [classes[label] if isinstance(label, (int, np.integer)) else label for label in labels]
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"style_shares: labels {unknown} are not among the classes {list(classes)}")
    counts = Counter(names)
    total = len(names)
    return {name: (counts[name] / total if total else 0.0) for name in classes}


def drift(cosines: np.ndarray) -> np.ndarray:
    """peft's drift of each (base, tuned) image pair from the cosine of their embeddings:
    ``(1 − cos) / 2``, in [0, 1]; 0 = the same image, 0.5 = orthogonal embeddings
    (huggingface/peft ``method_comparison/image-gen``, ``measure_drift``)."""
    return (1.0 - np.asarray(cosines, dtype=float)) / 2.0
