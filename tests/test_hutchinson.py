"""Hutchinson's estimator: unbiasedness, closed-form variance and honest standard errors."""

import logging
import math

import numpy as np
import pytest
import torch
from spectra import matrix_with_spectrum, spectrum

import hutch
from hutch._sampling import sample_probes

N = 100
NUM_SEEDS = 400


@pytest.mark.parametrize("kind", ["fast", "slow", "indefinite", "lowrank"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_unbiased_with_honest_std_error(sweep_seeds, kind, distribution):
    A = matrix_with_spectrum(spectrum(kind, N), seed=1)
    exact = float(spectrum(kind, N).sum())
    sweep = sweep_seeds(hutch.hutchinson, A, 20, NUM_SEEDS, distribution=distribution)
    sweep.assert_unbiased(exact)
    sweep.assert_honest_std_error()


def off_diagonal_square_sum(A):
    return float((A**2).sum() - (torch.diagonal(A) ** 2).sum())


def test_rademacher_variance_matches_closed_form():
    # Var(z^T A z) = 2 sum_{i != j} A_ij^2 for Rademacher z and symmetric A.
    A = matrix_with_spectrum(spectrum("indefinite", 60), seed=2)
    m, num_seeds = 10, 400
    closed_form = 2.0 * off_diagonal_square_sum(A) / m
    values = np.array([hutch.hutchinson(A, m, seed=s).value for s in range(num_seeds)])

    # The relative standard error of a sample variance is sqrt((kurtosis - 1) / N).
    centred = values - values.mean()
    kurtosis = np.mean(centred**4) / np.mean(centred**2) ** 2
    tolerance = 5.0 * math.sqrt((kurtosis - 1.0) / num_seeds)
    assert abs(values.var(ddof=1) / closed_form - 1.0) <= tolerance


def test_rademacher_std_error_matches_closed_form():
    # Pooled over seeds, m * std_error^2 estimates the single-term variance.
    A = matrix_with_spectrum(spectrum("slow", 60), seed=3)
    m, num_seeds = 10, 300
    closed_form = 2.0 * off_diagonal_square_sum(A)
    squares = np.array([m * hutch.hutchinson(A, m, seed=s).std_error ** 2 for s in range(num_seeds)])
    tolerance = 5.0 * squares.std(ddof=1) / math.sqrt(num_seeds)
    assert abs(squares.mean() - closed_form) <= tolerance


def test_gaussian_variance_matches_closed_form():
    # Var(g^T A g) = 2 ||A||_F^2 for standard normal g and symmetric A.
    A = matrix_with_spectrum(spectrum("slow", 60), seed=4)
    m, num_seeds = 10, 300
    closed_form = 2.0 * float((A**2).sum())
    squares = np.array(
        [m * hutch.hutchinson(A, m, seed=s, distribution="gaussian").std_error ** 2 for s in range(num_seeds)]
    )
    tolerance = 5.0 * squares.std(ddof=1) / math.sqrt(num_seeds)
    assert abs(squares.mean() - closed_form) <= tolerance


def test_diagonal_matrix_is_exact_with_rademacher():
    A = torch.diag(torch.linspace(-1.0, 3.0, 50, dtype=torch.float64))
    est = hutch.hutchinson(A, 5, seed=0)
    assert est.value == pytest.approx(float(torch.trace(A)), rel=1e-14)
    assert est.std_error == 0.0
    assert not est.exact
    assert est.confidence_interval() == (est.value, est.value)


def test_confidence_interval_coverage(sweep_seeds):
    A = matrix_with_spectrum(spectrum("slow", N), seed=5)
    exact = float(spectrum("slow", N).sum())
    num_seeds, level = 300, 0.9
    covered = 0
    for seed in range(num_seeds):
        low, high = hutch.hutchinson(A, 30, seed=seed).confidence_interval(level)
        covered += low <= exact <= high

    # Binomial standard error of the observed coverage.
    tolerance = 4.5 * math.sqrt(level * (1 - level) / num_seeds)
    assert abs(covered / num_seeds - level) <= tolerance


def test_result_fields():
    A = matrix_with_spectrum(spectrum("fast", 40), seed=6)
    est = hutch.hutchinson(A, 9, seed=11, distribution="gaussian")
    assert est.method == "hutchinson"
    assert est.num_matvecs == 9
    assert est.num_samples == 9
    assert est.seed == 11
    assert not est.exact
    assert est.info == {"distribution": "gaussian"}


def test_value_is_mean_of_probe_terms():
    # Naive reference: draw the same probes and average z^T A z.
    A = matrix_with_spectrum(spectrum("indefinite", 30), seed=7)
    est = hutch.hutchinson(A, 12, seed=5, batch_size=12)
    generator = torch.Generator().manual_seed(5)
    Z = sample_probes(30, 12, "rademacher", generator, torch.float64, torch.device("cpu"))
    terms = torch.stack([z @ A @ z for z in Z.T])
    assert est.value == pytest.approx(float(terms.mean()), rel=1e-12)
    assert est.std_error == pytest.approx(float(terms.std() / math.sqrt(12)), rel=1e-10)


def test_single_probe_has_no_std_error():
    A = matrix_with_spectrum(spectrum("slow", 30), seed=8)
    est = hutch.hutchinson(A, 1, seed=0)
    assert est.num_matvecs == 1
    assert math.isnan(est.std_error)
    assert est.confidence_interval() == (-math.inf, math.inf)


def test_seed_drawn_when_none_given(caplog):
    A = matrix_with_spectrum(spectrum("slow", 30), seed=9)
    with caplog.at_level(logging.INFO, logger="hutch"):
        est = hutch.hutchinson(A, 5)
    assert isinstance(est.seed, int)
    assert f"drawing probes from seed {est.seed}" in caplog.text
    assert hutch.hutchinson(A, 5, seed=est.seed).value == est.value


@pytest.mark.parametrize("num_matvecs", [0, -2])
def test_rejects_too_few_matvecs(num_matvecs):
    with pytest.raises(ValueError, match=rf"num_matvecs={num_matvecs} is too small for hutchinson, which needs at least 1"):
        hutch.hutchinson(torch.eye(5, dtype=torch.float64), num_matvecs, seed=0)


@pytest.mark.parametrize("num_matvecs, shown", [(2.0, "float 2.0"), (True, "bool True"), ("10", "str '10'")])
def test_rejects_non_int_matvecs(num_matvecs, shown):
    with pytest.raises(TypeError, match=f"num_matvecs must be an int; got {shown}"):
        hutch.hutchinson(torch.eye(5, dtype=torch.float64), num_matvecs, seed=0)


def test_sample_probes_rejects_unknown_distribution():
    with pytest.raises(ValueError, match=r"distribution must be one of \['rademacher', 'gaussian'\]; got 'normal'"):
        sample_probes(4, 2, "normal", torch.Generator(), torch.float64, torch.device("cpu"))
