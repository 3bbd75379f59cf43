"""The anatomy of a weight change, as small pure functions of tensors.

For one layer, ΔW = W_after − W_before as a 2-D matrix (a conv kernel flattened to
(out, in·k·k); an embedding table transposed to (width, rows), so that in every case the
*left* singular vectors live in the space the layer writes to):

- :func:`frobenius_norm` and :func:`relative_norm`: ‖ΔW‖_F and ‖ΔW‖_F / ‖W_before‖_F;
- :func:`singular_values`: the spectrum of ΔW, in three tiers by the matrix's smaller side s:
  s ≤ ``EXACT_MAX_SIDE``: ``torch.linalg.svdvals``; s ≤ ``GRAM_MAX_SIDE``: the eigenvalues of the
  float64 Gram matrix of the smaller side (σ_i² of W Wᵀ: exact down to √eps64 · σ_max ≈ 1.5e-8 · σ_max,
  far below the rank tolerance; 2.7 s instead of 42 s of ``svdvals`` on a 1280 × 11520 kernel on a
  shared CPU); larger: the top ``RANK_CAP`` values from ``torch.svd_lowrank`` (Halko, Martinsson &
  Tropp 2011, Algorithm 5.1 with ``niter`` power iterations). Its error: for a matrix of rank ≤ q the
  range finder captures the whole range, so the q values are exact up to rounding (every
  LoRA/LoHa/LoKr update below the cap); otherwise, with target rank k, oversampling p = q − k ≥ 2
  and i = ``niter``, E‖A − QQᵀA‖ ≤ [(1 + √(k/(p−1)))·σ_{k+1}^{2i+1} + (e√(k+p)/p)·(Σ_{j>k} σ_j^{2(2i+1)})^{1/2}]^{1/(2i+1)}
  (Halko et al. 2011, Corollary 10.10), and the ranks below are counted over the top q values only
  (``exact: False`` in the result says so);
- :func:`numerical_rank`: the singular values above max(m, n) · eps(float32) · σ_max — numpy's
  ``matrix_rank`` default (Press et al., *Numerical Recipes*, §2.6), with float32's eps because the
  trained weights are float32;
- :func:`effective_rank`: exp of the Shannon entropy of p_i = σ_i / Σ σ_j (Roy & Vetterli 2007,
  "The effective rank: a measure of effective dimensionality"), over the values above the rank
  tolerance;
- :func:`intruder_dimensions`: Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: an Illusion of
  Equivalence", arXiv 2410.21228), as the authors' reeceshuttle/intruder-dimensions
  ``find_intruder_dimensions.py`` computes it: among the top-k left singular vectors y_j of W_after,
  those whose largest |cos| with *every* left singular vector x_i of W_before (economy SVD) is below
  ε (their defaults: k = 10, ε = 0.5). Exact up to ``GRAM_MAX_SIDE``; beyond, svd_lowrank's vectors
  (see :func:`intruder_dimensions`), which are accurate only where the spectrum has gaps.

``torch.svd_lowrank`` is randomised: every call here runs under a fixed seed, so a result depends on
its inputs only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INTRUDER_TOP_K = 10  # top singular vectors of W_after examined (the authors' script: k=10)
INTRUDER_EPSILON = 0.5  # |cos| below which a direction is new (the authors' script: --intruder_dimension_threshold 0.5)
EXACT_MAX_SIDE = 640  # a smaller side up to this: LAPACK's SVDs (SD1.5: its first two UNet levels)
GRAM_MAX_SIDE = 1536  # up to this: exact through the float64 Gram matrix (SD1.5/SDXL UNets: 1280; SD3 medium: 1536)
RANK_CAP = 64  # singular values of ΔW computed by svd_lowrank beyond GRAM_MAX_SIDE
BASIS_TOP = 40  # W_before's top singular vectors first compared with beyond GRAM_MAX_SIDE (4 k)
OVERSAMPLING = 10  # svd_lowrank's q beyond the wanted rank (its docs: k + 5..10)
NITER = 4  # svd_lowrank power iterations (default 2; 4 sharpens singular vectors of slowly decaying spectra)
SEED = 0  # svd_lowrank's random test matrix
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class Spectrum:
    """Singular values of a matrix, descending; ``exact`` False when they are only its top ones."""

    values: torch.Tensor
    shape: tuple[int, int]
    exact: bool


@dataclass(frozen=True)
class Intruders:
    """The intruder test of one layer: ``count`` of the top ``k`` directions of W_after that are new,
    their largest |cos| with W_before's singular vectors (``max_cosines``, in σ order), and whether
    the test was exact (``exact``; else svd_lowrank's, see :func:`intruder_dimensions`)."""

    count: int
    max_cosines: tuple[float, ...]
    exact: bool


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as the 2-D matrix its anatomy is taken of: (out, in·k·k) for conv kernels."""
    return weight.reshape(weight.shape[0], -1) if weight.dim() > 2 else weight


def frobenius_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.double(), ord="fro"))


def relative_norm(delta: torch.Tensor, before: torch.Tensor) -> float | None:
    """‖ΔW‖_F / ‖W_before‖_F; None where W_before is zero (nothing to be relative to)."""
    base = frobenius_norm(before)
    return frobenius_norm(delta) / base if base > 0 else None


def _lowrank(matrix: torch.Tensor, q: int, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, S) of ``torch.svd_lowrank`` under a fixed seed (the result depends on the matrix only)."""
    with torch.random.fork_rng(devices=[matrix.device] if matrix.is_cuda else []):
        torch.manual_seed(SEED)
        left, values, _ = torch.svd_lowrank(matrix, q=q, niter=niter)
    return left, values


def _gram(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The float64 Gram matrix of the smaller side (W Wᵀ for a wide W, Wᵀ W for a tall one)."""
    weight = matrix.double()
    wide = weight.shape[0] <= weight.shape[1]
    return (weight @ weight.T if wide else weight.T @ weight), wide


def singular_values(
    matrix: torch.Tensor, exact_max_side: int = EXACT_MAX_SIDE, gram_max_side: int = GRAM_MAX_SIDE,
    rank_cap: int = RANK_CAP, niter: int = NITER,
) -> Spectrum:
    """The spectrum of ``matrix``: exact up to ``gram_max_side`` (see the module docstring), else its top ``rank_cap``."""
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    side = min(shape)
    if side <= max(exact_max_side, rank_cap):
        return Spectrum(torch.linalg.svdvals(matrix.float()), shape, exact=True)
    if side <= gram_max_side:
        gram, _ = _gram(matrix)
        values = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt()
        return Spectrum(values.float(), shape, exact=True)
    _, values = _lowrank(matrix.float(), rank_cap, niter)
    return Spectrum(values.sort(descending=True).values, shape, exact=False)


def rank_tolerance(spectrum: Spectrum) -> float:
    """max(m, n) · eps(float32) · σ_max: singular values at or below it count as zero."""
    largest = float(spectrum.values.max()) if spectrum.values.numel() else 0.0
    return max(spectrum.shape) * FLOAT32_EPS * largest


def numerical_rank(spectrum: Spectrum) -> int:
    """How many singular values exceed :func:`rank_tolerance` (of the computed ones: a lower bound of
    the rank when the spectrum is not exact and every computed value counts)."""
    if not spectrum.values.numel() or float(spectrum.values.max()) == 0.0:
        return 0
    return int((spectrum.values > rank_tolerance(spectrum)).sum())


def effective_rank(spectrum: Spectrum) -> float:
    """exp(−Σ p_i log p_i), p_i = σ_i / Σσ (Roy & Vetterli 2007), over the singular values above
    :func:`rank_tolerance` (those below it are rounding, not change); 0 for a zero matrix."""
    values = spectrum.values.double()
    values = values[values > rank_tolerance(spectrum)]
    total = float(values.sum())
    if total <= 0.0:
        return 0.0
    shares = values[values > 0] / total
    return math.exp(float(-(shares * shares.log()).sum()))


def left_singular_vectors(matrix: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The left singular vectors of the economy SVD (m × min(m, n); the top ``k`` when given), σ
    descending, from the eigendecomposition of the float64 Gram matrix of the smaller side
    (W Wᵀ = U Σ² Uᵀ; for a tall W, U = W V Σ⁻¹ over the σ above the rank tolerance: the others'
    vectors are arbitrary in any SVD). The same vectors as ``torch.linalg.svd`` (|cos| within 2e-5
    on SD1.5's shapes), 6× faster on a 1280 × 11520 kernel."""
    gram, wide = _gram(matrix)
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    if wide:
        return vectors
    singular = values.clamp(min=0).sqrt()
    kept = singular > max(matrix.shape) * FLOAT32_EPS * float(singular.max())
    return (matrix.double() @ vectors[:, kept]) / singular[kept]


def top_left_vectors(matrix: torch.Tensor, k: int, gram_max_side: int = GRAM_MAX_SIDE, niter: int = NITER) -> torch.Tensor:
    """The top ``k`` left singular vectors (columns, σ descending): exact, or from svd_lowrank."""
    k = min(k, *matrix.shape)
    if min(matrix.shape) <= gram_max_side:
        return left_singular_vectors(matrix, k)
    left, values = _lowrank(matrix.float(), min(k + OVERSAMPLING, *matrix.shape), niter)
    return left[:, values.argsort(descending=True)[:k]].double()


def intruder_dimensions(
    before: torch.Tensor,
    after: torch.Tensor,
    k: int = INTRUDER_TOP_K,
    epsilon: float = INTRUDER_EPSILON,
    gram_max_side: int = GRAM_MAX_SIDE,
) -> Intruders:
    """The intruder dimensions of W_after against W_before (see the module docstring): exact when
    the smaller side is at most ``gram_max_side``.

    Beyond it, W_after's top k vectors come from svd_lowrank and are first compared with W_before's
    top ``BASIS_TOP`` (svd_lowrank): a |cos| ≥ ε there settles "not new"; a remainder ‖y_j − P y_j‖ < ε
    (P: the projection on them) settles "new", since every other x_i is orthogonal to them and
    |cos(y_j, x_i)| ≤ ‖y_j − P y_j‖; otherwise W_before's whole economy basis is computed exactly."""
    directions = top_left_vectors(after, k, gram_max_side)
    exact = min(before.shape) <= gram_max_side
    basis = left_singular_vectors(before) if exact else top_left_vectors(before, BASIS_TOP, gram_max_side)
    cosines = (directions.T @ basis).abs()
    largest = cosines.max(dim=1).values
    if not exact:
        remainder = (1.0 - cosines.square().sum(dim=1)).clamp(min=0.0).sqrt()
        if bool(((largest < epsilon) & (remainder >= epsilon)).any()):
            largest = (directions.T @ left_singular_vectors(before)).abs().max(dim=1).values
    return Intruders(
        count=int((largest < epsilon).sum()), max_cosines=tuple(round(float(c), 4) for c in largest),
        exact=exact and min(after.shape) <= gram_max_side,
    )
