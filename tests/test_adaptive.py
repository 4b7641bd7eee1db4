"""Tolerance-driven estimation: interval coverage, the stopping rule, the budget cap and checks.

Coverage is checked over fewer runs than the benchmark's 500; the slack is
three binomial standard deviations on top of the three points the
benchmark allows.
"""

import math
import warnings

import pytest
import torch
from conftest import init_parameters
from spectra import matrix_with_spectrum, spectrum
from torch import nn

import hutch

CONFIDENCE = 0.9
RUNS = 150


def coverage_floor(confidence: float, runs: int) -> float:
    return confidence - 0.03 - 3.0 * math.sqrt(confidence * (1.0 - confidence) / runs)


def squared_error(outputs, targets):
    return ((outputs - targets) ** 2).mean()


@pytest.fixture
def regression():
    """A least-squares Hessian with trace (2/N) sum(||x||^2 + 1), known in closed form; P = 16*4 + 4."""
    model = init_parameters(nn.Linear(16, 4).double(), seed=0)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(50, 16, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 2.0, 16, dtype=torch.float64)
    targets = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    exact = 2.0 / 50 * float((inputs**2).sum() + 50)
    return hutch.HessianOperator(model, squared_error, (inputs, targets)), exact


def coverage(A, exact, method, rtol, runs=RUNS, **kwargs):
    covered = 0
    for seed in range(runs):
        est = hutch.adaptive_trace(A, rtol=rtol, confidence=CONFIDENCE, method=method, seed=seed, **kwargs)
        assert est.info["converged"] and not est.exact
        low, high = est.confidence_interval(CONFIDENCE)
        covered += low <= exact <= high
    return covered / runs


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_coverage_on_hessian_with_known_trace(regression, method):
    op, exact = regression
    assert hutch.exact_trace(op) == pytest.approx(exact, rel=1e-12)
    assert coverage(op, exact, method, rtol=0.03, runs=60) >= coverage_floor(CONFIDENCE, 60)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
@pytest.mark.parametrize("kind, rtol", [("slow", 0.05), ("indefinite", 0.15)])
def test_coverage_on_synthetic_matrices(method, kind, rtol):
    # Tolerances that need fewer than n = 200 probes, so no run switches to the exact trace.
    A = matrix_with_spectrum(spectrum(kind, 200), seed=2)
    exact = float(spectrum(kind, 200).sum())
    if kind == "indefinite":
        assert exact < 0
    assert coverage(A, exact, method, rtol=rtol) >= coverage_floor(CONFIDENCE, RUNS)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_stops_when_half_width_meets_tolerance(method):
    A = matrix_with_spectrum(spectrum("indefinite", 200), seed=3)
    for seed in range(5):
        est = hutch.adaptive_trace(A, rtol=0.1, atol=0.01, method=method, seed=seed, min_samples=40)
        low, high = est.confidence_interval(0.95)
        assert est.value < 0
        assert est.info["converged"]
        assert est.num_samples >= 40
        assert (high - low) / 2 == pytest.approx(est.info["half_width"], rel=1e-12)
        assert est.info["half_width"] <= 0.01 + 0.1 * abs(est.value)
        assert est.info["tolerance"] == pytest.approx(0.01 + 0.1 * abs(est.value), rel=1e-12)


def test_counts_every_product(counting_operator):
    op = counting_operator(matrix_with_spectrum(spectrum("fast", 200), seed=4))
    est = hutch.adaptive_trace(op, rtol=0.01, method="hutchpp", seed=0)
    assert not est.exact
    assert est.num_matvecs == op.num_columns
    assert est.info["sketch_size"] > 0
    assert est.num_matvecs == 2 * est.info["sketch_size"] + est.info["residual_probes"]


def test_hutchpp_split_pays_on_fast_decay(counting_operator):
    # Hutchinson would need more than n = 300 probes and switches to the exact trace.
    A = matrix_with_spectrum(spectrum("fast", 300), seed=5)
    plus = hutch.adaptive_trace(A, rtol=0.002, method="hutchpp", seed=0)
    op = counting_operator(A)
    plain = hutch.adaptive_trace(op, rtol=0.002, method="hutchinson", seed=0)
    assert plus.info["converged"] and not plus.exact
    assert plus.num_matvecs * 3 <= plain.num_matvecs
    assert plain.exact and plain.value == pytest.approx(float(torch.trace(A)), rel=1e-12)
    assert plain.num_matvecs == op.num_columns == 300 + plain.info["exact_after_probes"]


def test_budget_cap_warns_and_flags():
    A = matrix_with_spectrum(spectrum("slow", 300), seed=6)
    with pytest.warns(hutch.ToleranceWarning, match=r"max_matvecs=60 was spent before the 95% interval met the tolerance") as record:
        est = hutch.adaptive_trace(A, rtol=1e-4, method="hutchinson", max_matvecs=60, seed=0)
    assert record[0].filename == __file__
    assert not est.info["converged"]
    assert est.num_matvecs == 60
    assert est.info["half_width"] > est.info["tolerance"]


def test_same_seed_same_result():
    A = matrix_with_spectrum(spectrum("slow", 200), seed=7)
    first = hutch.adaptive_trace(A, rtol=0.02, seed=3)
    second = hutch.adaptive_trace(A, rtol=0.02, seed=3)
    assert first.value == second.value
    assert first.num_matvecs == second.num_matvecs
    assert first.seed == 3


def test_small_operator_is_exact():
    A = matrix_with_spectrum(spectrum("slow", 20), seed=0)
    est = hutch.adaptive_trace(A, rtol=0.01, seed=0)
    assert est.exact and est.num_matvecs == 20
    assert est.value == pytest.approx(float(torch.trace(A)), rel=1e-12)


def test_trace_with_tolerance(mlp, mlp_data):
    from torch.nn import functional as F

    exact = hutch.exact_trace(hutch.HessianOperator(mlp, F.cross_entropy, mlp_data))
    est = hutch.trace(mlp, F.cross_entropy, mlp_data, rtol=0.05, seed=0)
    assert est.exact or est.info["converged"]
    assert abs(est.value - exact) <= 5 * est.std_error + 1e-12
    with pytest.warns(hutch.ToleranceWarning) as record:
        hutch.trace(mlp, F.cross_entropy, mlp_data, method="hutchinson", rtol=1e-6, min_samples=5, max_matvecs=10, seed=0)
    assert record[0].filename == __file__


# --- invalid arguments --------------------------------------------------------


@pytest.fixture
def A():
    return matrix_with_spectrum(spectrum("slow", 100), seed=0)


def test_rejects_missing_or_bad_tolerance(A):
    with pytest.raises(ValueError, match="a tolerance-driven run needs rtol > 0 or atol > 0; got rtol=None, atol=None"):
        hutch.adaptive_trace(A, seed=0)
    with pytest.raises(ValueError, match="a tolerance-driven run needs rtol > 0 or atol > 0; got rtol=0, atol=0.0"):
        hutch.adaptive_trace(A, rtol=0, atol=0.0, seed=0)
    with pytest.raises(ValueError, match=r"rtol must be None or a finite number >= 0; got -0.1"):
        hutch.adaptive_trace(A, rtol=-0.1, seed=0)
    with pytest.raises(ValueError, match=r"atol must be None or a finite number >= 0; got inf"):
        hutch.adaptive_trace(A, atol=math.inf, seed=0)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95, True])
def test_rejects_bad_confidence(A, confidence):
    with pytest.raises(ValueError, match=rf"confidence must be a probability strictly between 0 and 1; got {confidence!r}"):
        hutch.adaptive_trace(A, rtol=0.1, confidence=confidence, seed=0)


def test_rejects_bad_counts(A):
    with pytest.raises(ValueError, match="max_matvecs=20 is below the minimum of 32; raise max_matvecs"):
        hutch.adaptive_trace(A, rtol=0.1, max_matvecs=20, seed=0)
    with pytest.raises(ValueError, match="min_samples=1 is below the minimum of 2"):
        hutch.adaptive_trace(A, rtol=0.1, min_samples=1, seed=0)
    with pytest.raises(TypeError, match="max_matvecs must be an int; got float 100.0"):
        hutch.adaptive_trace(A, rtol=0.1, max_matvecs=100.0, seed=0)


def test_rejects_method_without_tolerance_mode(A):
    with pytest.raises(ValueError, match=r"method must be one of \['hutchinson', 'hutchpp'\] for a tolerance-driven run; got 'xtrace'"):
        hutch.adaptive_trace(A, rtol=0.1, method="xtrace", seed=0)


def test_trace_rejects_mixed_modes(mlp, mlp_data):
    from torch.nn import functional as F

    with pytest.raises(ValueError, match="num_matvecs=50 sets a fixed budget, which a tolerance replaces"):
        hutch.trace(mlp, F.cross_entropy, mlp_data, num_matvecs=50, rtol=0.1)
    with pytest.raises(ValueError, match="method='xtrace' has no tolerance-driven mode"):
        hutch.trace(mlp, F.cross_entropy, mlp_data, method="xtrace", rtol=0.1)
    with pytest.raises(ValueError, match="max_matvecs=50 only caps a tolerance-driven run"):
        hutch.trace(mlp, F.cross_entropy, mlp_data, max_matvecs=50)


def test_trace_runs_xtrace(mlp, mlp_data):
    from torch.nn import functional as F

    est = hutch.trace(mlp, F.cross_entropy, mlp_data, method="xtrace", num_matvecs=12, seed=0)
    assert est.method == "xtrace"
    assert est.num_matvecs == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hutch.trace(mlp, F.cross_entropy, mlp_data, method="xtrace", num_matvecs=12, seed=0).value == est.value
