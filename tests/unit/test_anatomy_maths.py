"""The anatomy's maths on tiny matrices (unit tier): norms, ranks, effective rank, intruder dimensions."""

from __future__ import annotations

import math

import pytest
import torch

from sdtune.anatomy import maths
from sdtune.anatomy.compute import lapack_single_threaded


@pytest.fixture(autouse=True)
def _one_lapack_thread():
    """As the anatomy runs them (compute.py): LAPACK's threads spin on shared cores (a 700 × 660 case
    took 19–28 s with 2 threads on this project's loaded machine, 0.1–0.3 s with 1)."""
    with lapack_single_threaded():
        yield


def _orthonormal(rows: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, columns, generator=generator)).Q


def _with_spectrum(values: list[float], rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """A matrix with exactly these singular values (and random singular vectors)."""
    left, right = _orthonormal(rows, len(values), seed), _orthonormal(columns, len(values), seed + 1)
    return left @ torch.diag(torch.tensor(values)) @ right.T


def test_norms_and_the_relative_change():
    before = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    delta = torch.tensor([[0.0, 0.5], [0.0, 0.0]])
    assert maths.frobenius_norm(before) == pytest.approx(5.0)
    assert maths.relative_norm(delta, before) == pytest.approx(0.1)
    assert maths.relative_norm(delta, torch.zeros(2, 2)) is None


SVD, GRAM, LOWRANK = {}, {"exact_max_side": 64}, {"exact_max_side": 64, "gram_max_side": 100}  # the three tiers


@pytest.mark.parametrize(("rank", "rows", "columns", "tier"), [
    (1, 40, 24, SVD), (4, 64, 64, SVD), (4, 700, 660, GRAM), (3, 8, 3000, SVD), (4, 300, 200, GRAM),
    (4, 300, 200, LOWRANK), (2, 150, 900, LOWRANK),
])
def test_a_rank_r_lora_update_has_numerical_rank_at_most_r(rank, rows, columns, tier):
    """ΔW = s·B·A with B (out × r), A (r × in): rank ≤ r, in every tier (svd_lowrank is exact for a rank
    below its q); as float32 products, as a run computes them."""
    generator = torch.Generator().manual_seed(rank + rows)
    down, up = torch.randn(rank, columns, generator=generator), torch.randn(rows, rank, generator=generator) * 1e-3
    spectrum = maths.singular_values(2.0 * up @ down, **tier)
    assert maths.numerical_rank(spectrum) == rank
    assert spectrum.exact == (tier is not LOWRANK)
    assert maths.effective_rank(spectrum) <= rank + 1e-6


def test_the_gram_tier_gives_the_singular_values_of_an_svd():
    matrix = torch.randn(90, 400, generator=torch.Generator().manual_seed(4))
    exact, gram = maths.singular_values(matrix), maths.singular_values(matrix, **GRAM)
    assert torch.allclose(gram.values, exact.values, rtol=1e-5)
    assert maths.effective_rank(gram) == pytest.approx(maths.effective_rank(exact), rel=1e-5)
    tall = torch.randn(300, 80, generator=torch.Generator().manual_seed(5))
    vectors = maths.left_singular_vectors(tall, 5)
    reference = torch.linalg.svd(tall.double(), full_matrices=False).U[:, :5]
    assert torch.allclose((vectors.T @ reference).abs().diagonal(), torch.ones(5, dtype=torch.float64), atol=1e-6)


def test_numerical_rank_counts_singular_values_above_the_stated_tolerance():
    spectrum = maths.Spectrum(torch.tensor([1.0, 1e-3, 1e-4, 1e-6]), (100, 50), exact=True)
    assert maths.rank_tolerance(spectrum) == pytest.approx(100 * maths.FLOAT32_EPS)  # max(m, n) · eps · σ_max
    assert maths.numerical_rank(spectrum) == 3
    assert maths.numerical_rank(maths.singular_values(torch.zeros(5, 4))) == 0


def test_effective_rank_is_the_exponential_of_the_spectrum_entropy():
    equal = maths.singular_values(_with_spectrum([2.0] * 6, 20, 10))
    assert maths.effective_rank(equal) == pytest.approx(6.0, rel=1e-4)  # k equal values: k
    one = maths.singular_values(_with_spectrum([5.0], 20, 10))
    assert maths.effective_rank(one) == pytest.approx(1.0, rel=1e-4)
    two = maths.Spectrum(torch.tensor([3.0, 1.0]), (2, 2), exact=True)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # Roy & Vetterli: p = σ / Σσ
    assert maths.effective_rank(two) == pytest.approx(math.exp(entropy))
    assert maths.effective_rank(maths.singular_values(torch.zeros(3, 3))) == 0.0


def test_conv_kernels_are_flattened_to_out_by_in_times_kernel():
    assert maths.as_matrix(torch.zeros(8, 4, 3, 3)).shape == (8, 36)
    assert maths.as_matrix(torch.zeros(8, 4)).shape == (8, 4)


def _decaying(side: int) -> list[float]:
    """A weight-like spectrum: well-separated leading values (the intruder test compares singular
    vectors, which near-equal singular values leave undetermined), a long small tail."""
    return [10.0 * 0.85**i + 0.05 for i in range(side)]


@pytest.mark.parametrize(("side", "tier"), [(48, {}), (700, {}), (300, {"gram_max_side": 100})])  # the last: svd_lowrank
def test_a_planted_intruder_direction_is_found(side, tier):
    """W_before with a decaying spectrum; W_after adds one strong random direction, nearly orthogonal
    to every singular vector of W_before: it is an intruder (|cos| < 0.5 with every x_i)."""
    values = _decaying(side)
    before = _with_spectrum(values, side, side, seed=3)
    generator = torch.Generator().manual_seed(7)
    direction = torch.randn(side, generator=generator)
    direction /= direction.norm()
    right = torch.randn(side, generator=generator)
    after = before + 30.0 * torch.outer(direction, right / right.norm())
    found = maths.intruder_dimensions(before, after, **tier)
    assert found.count == 1
    assert found.max_cosines[0] < maths.INTRUDER_EPSILON  # the new top direction
    assert all(c >= maths.INTRUDER_EPSILON for c in found.max_cosines[1:])
    assert found.exact == (not tier)


@pytest.mark.parametrize(("side", "tier"), [(48, {}), (700, {}), (300, {"gram_max_side": 100})])
def test_a_small_change_along_existing_directions_has_no_intruder(side, tier):
    values = _decaying(side)
    before = _with_spectrum(values, side, side, seed=5)
    after = before * 1.01 + 1e-4 * torch.randn(side, side, generator=torch.Generator().manual_seed(1))
    found = maths.intruder_dimensions(before, after, **tier)
    assert found.count == 0 and len(found.max_cosines) == maths.INTRUDER_TOP_K


def test_svd_lowrank_results_do_not_depend_on_the_global_random_state():
    matrix = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(1)
    first = maths.singular_values(matrix, **LOWRANK).values
    torch.manual_seed(99)
    state = torch.get_rng_state()
    second = maths.singular_values(matrix, **LOWRANK).values
    assert torch.equal(first, second) and torch.equal(state, torch.get_rng_state())
