"""Hutch++: unbiasedness, exactness on low rank, the sketch, and its gain over Hutchinson."""

import math

import numpy as np
import pytest
import torch
from spectra import matrix_with_spectrum, spectrum

import hutch
from hutch._sampling import sample_probes

N = 100
NUM_SEEDS = 400


@pytest.mark.parametrize("kind", ["fast", "slow", "indefinite"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_unbiased_with_honest_std_error(sweep_seeds, kind, distribution):
    A = matrix_with_spectrum(spectrum(kind, N), seed=1)
    exact = float(spectrum(kind, N).sum())
    sweep = sweep_seeds(hutch.hutchpp, A, 30, NUM_SEEDS, distribution=distribution)
    sweep.assert_unbiased(exact)
    sweep.assert_honest_std_error()


@pytest.mark.parametrize("num_matvecs", [15, 18, 40])
def test_exact_when_rank_within_sketch(num_matvecs):
    # The "lowrank" profile has rank 5 <= k = num_matvecs // 3.
    A = matrix_with_spectrum(spectrum("lowrank", N), seed=2)
    for seed in range(10):
        est = hutch.hutchpp(A, num_matvecs, seed=seed)
        assert est.value == pytest.approx(21.0, abs=1e-10)
        assert est.std_error <= 1e-10
        assert est.info["deflated_trace"] == pytest.approx(21.0, abs=1e-10)
        assert not est.exact


def test_rank_above_sketch_unbiased(sweep_seeds):
    # With k = 4 < rank 5 the residual carries part of the trace, and the estimate still centres on it.
    A = matrix_with_spectrum(spectrum("lowrank", N), seed=2)
    sweep = sweep_seeds(hutch.hutchpp, A, 12, 100)
    assert sweep.spread > 1e-3
    sweep.assert_unbiased(21.0)


def test_beats_hutchinson_on_fast_decay():
    A = matrix_with_spectrum(spectrum("fast", 200), seed=3)
    exact = float(spectrum("fast", 200).sum())
    seeds = range(40)
    errors_pp = [abs(hutch.hutchpp(A, 30, seed=s).value - exact) for s in seeds]
    errors_h = [abs(hutch.hutchinson(A, 30, seed=s).value - exact) for s in seeds]
    assert np.median(errors_pp) < 0.2 * np.median(errors_h)


def reference_sketch(A, num_matvecs, seed, distribution):
    """Redraw Hutch++'s sketch from the same seed and return its basis Q."""
    k = num_matvecs // 3
    generator = torch.Generator().manual_seed(seed)
    S = sample_probes(A.shape[0], k, distribution, generator, A.dtype, A.device)
    Q, _ = torch.linalg.qr(A @ S)
    return Q


def test_deflated_trace_matches_naive_sketch():
    A = matrix_with_spectrum(spectrum("slow", 60), seed=4)
    for seed in range(5):
        est = hutch.hutchpp(A, 21, seed=seed)
        Q = reference_sketch(A, 21, seed, "rademacher")
        assert est.info["deflated_trace"] == pytest.approx(float(torch.trace(Q.T @ A @ Q)), rel=1e-10)


def test_std_error_matches_conditional_variance():
    # Given the sketch Q and P = I - QQ^T, a Gaussian residual term g^T P A P g has
    # variance 2 ||P A P||_F^2, so r * std_error^2 estimates it seed by seed.
    n, m = 60, 24
    A = matrix_with_spectrum(spectrum("slow", n), seed=5)
    ratios = []
    for seed in range(200):
        est = hutch.hutchpp(A, m, seed=seed, distribution="gaussian")
        Q = reference_sketch(A, m, seed, "gaussian")
        P = torch.eye(n, dtype=torch.float64) - Q @ Q.T
        conditional = 2.0 * float(((P @ A @ P) ** 2).sum())
        ratios.append(est.num_samples * est.std_error**2 / conditional)
    ratios = np.array(ratios)
    tolerance = 4.5 * ratios.std(ddof=1) / math.sqrt(ratios.size)
    assert abs(ratios.mean() - 1.0) <= tolerance


def test_budget_split_and_fields():
    A = matrix_with_spectrum(spectrum("fast", 50), seed=6)
    for m in (4, 5, 6, 17, 30):
        est = hutch.hutchpp(A, m, seed=1)
        k = m // 3
        assert est.info["sketch_size"] == k
        assert est.info["residual_probes"] == m - 2 * k
        assert est.num_samples == m - 2 * k
        assert est.num_matvecs == m
        assert est.method == "hutchpp"
        assert est.seed == 1
        assert est.info["distribution"] == "rademacher"


def test_deflated_trace_below_trace_for_psd():
    A = matrix_with_spectrum(spectrum("exp", 80), seed=7)
    exact = float(spectrum("exp", 80).sum())
    for seed in range(5):
        deflated = hutch.hutchpp(A, 30, seed=seed).info["deflated_trace"]
        assert 0.0 < deflated <= exact + 1e-12


@pytest.mark.parametrize("num_matvecs", [1, 3])
def test_rejects_too_few_matvecs(num_matvecs):
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"num_matvecs={num_matvecs} is too small for hutchpp, which needs at least 4"):
        hutch.hutchpp(A, num_matvecs, seed=0)


def test_small_budget_covering_dimension_is_exact():
    A = matrix_with_spectrum(torch.tensor([3.0, -1.0, 0.5]), seed=8)
    est = hutch.hutchpp(A, 3, seed=0)
    assert est.exact
    assert est.value == pytest.approx(2.5, rel=1e-12)


@pytest.mark.parametrize("num_matvecs, shown", [(12.0, "float 12.0"), (False, "bool False"), (None, "NoneType None")])
def test_rejects_non_int_matvecs(num_matvecs, shown):
    with pytest.raises(TypeError, match=f"num_matvecs must be an int; got {shown}"):
        hutch.hutchpp(torch.eye(10, dtype=torch.float64), num_matvecs, seed=0)
