"""XTrace and XNysTrace: naive leave-one-out references seed by seed, known spectra, PSD checks."""

import math

import pytest
import torch
from conftest import init_parameters
from spectra import matrix_with_spectrum, spectrum
from torch import nn
from torch.nn import functional as F

import hutch
from hutch.xtrace import sample_test_vectors

N = 80


def naive_xtrace(A, num_matvecs, distribution, seed):
    """XTrace written as its definition: one QR and one deflated estimate per left-out vector."""
    n, k = A.shape[0], num_matvecs // 2
    generator = torch.Generator().manual_seed(seed)
    Omega = sample_test_vectors(n, k, distribution, generator, A.dtype, A.device)
    Y = A @ Omega

    def term(Q, omega, dim):
        x = omega - Q @ (Q.T @ omega)
        if distribution == "gaussian":
            x = x * math.sqrt(dim) / x.norm()
        return float(torch.trace(Q.T @ A @ Q) + x @ A @ x)

    estimates = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        Q_i, _ = torch.linalg.qr(Y[:, others])
        estimates.append(term(Q_i, Omega[:, i], n - k + 1))
    if num_matvecs % 2 == 1:
        omega = sample_test_vectors(n, 1, distribution, generator, A.dtype, A.device)[:, 0]
        estimates.append(term(torch.linalg.qr(Y)[0], omega, n - k))
    values = torch.tensor(estimates, dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def naive_xnystrace(A, num_matvecs, distribution, seed):
    """XNysTrace written as its definition, with a pseudo-inverse per left-out vector."""
    n, k = A.shape[0], num_matvecs
    generator = torch.Generator().manual_seed(seed)
    Omega = sample_test_vectors(n, k, distribution, generator, A.dtype, A.device)
    Y = A @ Omega
    estimates = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        Omega_i, Y_i = Omega[:, others], Y[:, others]
        A_hat = Y_i @ torch.linalg.pinv(Omega_i.T @ Y_i) @ Y_i.T
        omega = Omega[:, i]
        if distribution == "gaussian":
            Q, _ = torch.linalg.qr(Omega_i)
            omega = omega - Q @ (Q.T @ omega)
            omega = omega * math.sqrt(n - k + 1) / omega.norm()
        estimates.append(float(torch.trace(A_hat) + omega @ (A - A_hat) @ omega))
    values = torch.tensor(estimates, dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(k))


@pytest.mark.parametrize("kind", ["fast", "slow", "indefinite", "exp"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("num_matvecs", [20, 21])
def test_xtrace_matches_naive_reference(kind, distribution, num_matvecs):
    A = matrix_with_spectrum(spectrum(kind, N), seed=1)
    for seed in range(3):
        est = hutch.xtrace(A, num_matvecs, distribution=distribution, seed=seed)
        value, std_error = naive_xtrace(A, num_matvecs, distribution, seed)
        assert est.value == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert est.std_error == pytest.approx(std_error, rel=1e-7, abs=1e-12)
        assert est.num_samples == num_matvecs - num_matvecs // 2


@pytest.mark.parametrize("kind", ["fast", "slow", "exp"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_xnystrace_matches_naive_reference(kind, distribution):
    A = matrix_with_spectrum(spectrum(kind, N), seed=2)
    for seed in range(3):
        est = hutch.xnystrace(A, 12, distribution=distribution, seed=seed)
        value, std_error = naive_xnystrace(A, 12, distribution, seed)
        # The shift nu ~ 1e-16 ||A Omega|| separates the two by rounding only.
        assert est.value == pytest.approx(value, rel=1e-8)
        assert est.std_error == pytest.approx(std_error, rel=1e-5)


@pytest.mark.parametrize("estimator", [hutch.xtrace, hutch.xnystrace])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_exact_for_low_rank(estimator, distribution):
    # Rank 5: every leave-one-out sketch of 6 or more vectors captures the range.
    A = matrix_with_spectrum(spectrum("lowrank", N), seed=3)
    est = estimator(A, 16, distribution=distribution, seed=0)
    assert est.value == pytest.approx(21.0, rel=1e-10)
    assert est.std_error < 1e-10


@pytest.mark.parametrize(
    "estimator, kind",
    [(hutch.xtrace, "slow"), (hutch.xtrace, "indefinite"), (hutch.xnystrace, "slow"), (hutch.xnystrace, "fast")],
)
def test_unbiased_on_known_spectra(sweep_seeds, estimator, kind):
    A = matrix_with_spectrum(spectrum(kind, N), seed=4)
    sweep = sweep_seeds(estimator, A, 16, 200)
    sweep.assert_unbiased(float(spectrum(kind, N).sum()))


@pytest.mark.parametrize("estimator", [hutch.xtrace, hutch.xnystrace])
def test_std_error_tracks_spread(sweep_seeds, estimator):
    # The leave-one-out error is a heuristic: require the right order of magnitude.
    A = matrix_with_spectrum(spectrum("slow", N), seed=5)
    sweep = sweep_seeds(estimator, A, 20, 100)
    reported = float((sweep.std_errors**2).mean() ** 0.5)
    assert 0.5 * sweep.spread <= reported <= 2.0 * sweep.spread


def test_xtrace_beats_hutchinson_on_fast_decay():
    n = 300
    A = matrix_with_spectrum(spectrum("fast", n), seed=6)
    exact = float(spectrum("fast", n).sum())
    xtrace_errors = sorted(hutch.xtrace(A, 40, seed=s).relative_error(exact) for s in range(11))
    hutchinson_errors = sorted(hutch.hutchinson(A, 40, seed=s).relative_error(exact) for s in range(11))
    assert xtrace_errors[5] <= hutchinson_errors[5] / 10


def test_xtrace_estimates_within_std_errors_on_hessian(mlp, mlp_data):
    op = hutch.HessianOperator(mlp, F.cross_entropy, mlp_data)
    exact = hutch.exact_trace(op)
    for seed in range(4):
        est = hutch.xtrace(op, 14, seed=seed)
        assert abs(est.value - exact) <= 5.0 * est.std_error


# --- XNysTrace on PSD operators -----------------------------------------------


def squared_error(outputs, targets):
    return ((outputs - targets) ** 2).mean()


@pytest.fixture
def regression():
    """A linear least-squares model: its Hessian is PSD with trace (2/N) sum(||x||^2 + 1)."""
    model = init_parameters(nn.Linear(6, 3).double(), seed=0)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    targets = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    exact = 2.0 / 40 * float((inputs**2).sum() + 40)
    return model, (inputs, targets), exact


def test_xnystrace_on_psd_hessian(regression):
    model, data, exact = regression
    op = hutch.HessianOperator(model, squared_error, data)
    assert hutch.exact_trace(op) == pytest.approx(exact, rel=1e-12)
    # P = 6*3 + 3 = 21; ten test vectors stay below the dimension.
    est = hutch.xnystrace(op, 10, seed=0)
    assert abs(est.value - exact) <= 5.0 * est.std_error
    assert est.num_matvecs == 10


@pytest.mark.parametrize("num_matvecs, batch_size", [(7, None), (12, 5), (59, 1)])
def test_xnystrace_budget_accounting(counting_operator, num_matvecs, batch_size):
    op = counting_operator(matrix_with_spectrum(spectrum("slow", 60), seed=0))
    est = hutch.xnystrace(op, num_matvecs, seed=0, batch_size=batch_size)
    assert est.num_matvecs == num_matvecs == op.num_columns
    if batch_size is not None:
        assert max(op.calls) <= batch_size


@pytest.mark.parametrize("estimator", [hutch.xtrace, hutch.xnystrace])
def test_exact_at_full_budget(estimator, counting_operator):
    A = matrix_with_spectrum(spectrum("slow", 30), seed=0)
    op = counting_operator(A)
    est = estimator(op, 30, seed=0)
    assert est.exact and est.std_error == 0.0
    assert op.num_columns == 30
    assert est.value == pytest.approx(float(torch.trace(A)), rel=1e-12)


def test_xnystrace_float32_and_determinism():
    A = matrix_with_spectrum(spectrum("slow", 60), seed=0)
    exact = float(torch.trace(A))
    est = hutch.xnystrace(A.float(), 12, seed=3)
    assert abs(est.value - exact) <= 5.0 * est.std_error + 1e-4 * exact
    assert hutch.xnystrace(A, 12, seed=3).value == hutch.xnystrace(A, 12, seed=3).value
    assert hutch.xnystrace(A, 12, seed=3).value != hutch.xnystrace(A, 12, seed=4).value


def test_xnystrace_rejects_negative_quadratic_form():
    A = -matrix_with_spectrum(spectrum("slow", 40), seed=0)
    with pytest.raises(ValueError, match=r"A is not positive semi-definite: a test vector gave omega\^T A omega = .* < 0.*use hutch.xtrace"):
        hutch.xnystrace(A, 8, seed=0)


def test_xnystrace_rejects_indefinite_core():
    # Positive quadratic forms on every test vector, but an indefinite core matrix.
    eigenvalues = torch.ones(40, dtype=torch.float64)
    eigenvalues[0] = -0.5
    A = matrix_with_spectrum(eigenvalues, seed=0)
    with pytest.raises(ValueError, match="Omega\\^T A Omega stayed indefinite after shifting"):
        for seed in range(20):
            hutch.xnystrace(A, 30, seed=seed)


@pytest.mark.parametrize("estimator, minimum", [(hutch.xtrace, 4), (hutch.xnystrace, 2)])
def test_rejects_small_budget(estimator, minimum):
    A = matrix_with_spectrum(spectrum("slow", 40), seed=0)
    with pytest.raises(ValueError, match=rf"num_matvecs={minimum - 1} is too small for {estimator.__name__}, which needs at least {minimum}"):
        estimator(A, minimum - 1, seed=0)


def test_xnystrace_rejects_bad_distribution():
    A = matrix_with_spectrum(spectrum("slow", 40), seed=0)
    with pytest.raises(ValueError, match=r"distribution must be one of \['rademacher', 'gaussian'\]; got 'sphere'"):
        hutch.xnystrace(A, 8, seed=0, distribution="sphere")
