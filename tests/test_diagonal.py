"""Diagonal estimators: exact references, a naive XDiag, per-parameter shapes and argument checks."""

import pytest
import torch
from spectra import matrix_with_spectrum, spectrum
from torch.nn import functional as F

import hutch
from hutch._sampling import sample_probes
from hutch.xtrace import leave_one_out_directions

N = 60
METHODS = ["hutchinson", "hutchpp", "xdiag"]


@pytest.fixture
def A():
    return matrix_with_spectrum(spectrum("slow", N), seed=0)


def naive_xdiag(A, num_matvecs, seed):
    """XDiag from its definition: for each left-out vector, its own sketch and residual probe."""
    n, k = A.shape[0], num_matvecs // 2
    generator = torch.Generator().manual_seed(seed)
    Omega = sample_probes(n, k, "rademacher", generator, A.dtype, A.device)
    Y = A @ Omega
    samples = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        Q, _ = torch.linalg.qr(Y[:, others])
        P = Q @ Q.T
        omega = Omega[:, i]
        samples.append(torch.diagonal(P @ A) + omega * ((torch.eye(n, dtype=A.dtype) - P) @ A @ omega))
    return torch.stack(samples, dim=1).mean(dim=1)


@pytest.mark.parametrize("nonsymmetric", [False, True])
def test_xdiag_matches_naive_reference(A, nonsymmetric):
    if nonsymmetric:
        A = A + 0.3 * torch.randn(N, N, generator=torch.Generator().manual_seed(9), dtype=A.dtype)
    for seed in range(3):
        est = hutch.diagonal(A, 20, method="xdiag", seed=seed)
        torch.testing.assert_close(est.values, naive_xdiag(A, 20, seed), rtol=1e-9, atol=1e-11)


def test_leave_one_out_directions_are_orthogonal_to_other_columns():
    R = torch.linalg.qr(torch.randn(30, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[1]
    S = leave_one_out_directions(R)
    product = S.T @ R
    off_diagonal = product - torch.diag(torch.diagonal(product))
    assert off_diagonal.abs().max() < 1e-12
    torch.testing.assert_close(torch.linalg.vector_norm(S, dim=0), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("method", ["hutchpp", "xdiag"])
@pytest.mark.parametrize("nonsymmetric", [False, True])
def test_exact_for_low_rank(method, nonsymmetric):
    # Rank 5: Diag++ and XDiag sketches of 6 or more columns capture the whole range.
    B = matrix_with_spectrum(spectrum("lowrank", N), seed=1)
    if nonsymmetric:
        B = B @ matrix_with_spectrum(torch.linspace(0.5, 2.0, N), seed=2)
    est = hutch.diagonal(B, 30, method=method, seed=0)
    torch.testing.assert_close(est.values, torch.diagonal(B), rtol=1e-9, atol=1e-11)
    assert est.std_error.max() < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_entries_within_std_errors(A, method):
    truth = torch.diagonal(A)
    est = hutch.diagonal(A, 45, method=method, seed=1)
    z = (est.values - truth).abs() / est.std_error
    assert est.values.shape == est.std_error.shape == (N,)
    assert float(z.max()) <= 5.0
    assert est.num_matvecs == 45


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_over_seeds(A, method):
    truth = torch.diagonal(A)
    runs = torch.stack([hutch.diagonal(A, 12, method=method, seed=s).values for s in range(150)])
    sem = runs.std(dim=0) / 150**0.5
    assert float(((runs.mean(dim=0) - truth).abs() / sem).max()) <= 5.0


def test_hutchinson_exact_for_diagonal_matrix():
    D = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    est = hutch.diagonal(D, 3, seed=0)
    torch.testing.assert_close(est.values, torch.diagonal(D))
    assert float(est.std_error.max()) == 0.0


def test_hutchinson_diagonal_sums_to_hutchinson_trace(A):
    for batch_size in [None, 4]:
        est = hutch.diagonal(A, 17, seed=3, batch_size=batch_size)
        assert est.trace() == pytest.approx(hutch.hutchinson(A, 17, seed=3, batch_size=batch_size).value, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_matvecs, batch_size", [(13, None), (12, 5), (31, 1)])
def test_budget_accounting(A, counting_operator, method, num_matvecs, batch_size):
    op = counting_operator(A)
    est = hutch.diagonal(op, num_matvecs, method=method, seed=0, batch_size=batch_size)
    assert est.num_matvecs == num_matvecs == op.num_columns
    if batch_size is not None:
        assert max(op.calls) <= batch_size


@pytest.mark.parametrize("method", METHODS)
def test_exact_at_full_budget(A, counting_operator, method):
    op = counting_operator(A)
    est = hutch.diagonal(op, N, method=method, seed=0)
    assert est.exact
    assert op.num_columns == N
    torch.testing.assert_close(est.values, torch.diagonal(A))
    assert float(est.std_error.abs().max()) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_hessian_per_parameter(mlp, mlp_data, method):
    op = hutch.HessianOperator(mlp, F.cross_entropy, mlp_data)
    truth = hutch.exact_diagonal(op)
    est = hutch.diagonal(op, 20, method=method, seed=2)
    parts = est.per_parameter()
    errors = est.std_error_per_parameter()
    assert list(parts) == op.layout.names
    for name, p in mlp.named_parameters():
        assert parts[name].shape == p.shape
        assert errors[name].shape == p.shape
    torch.testing.assert_close(op.flatten(parts), est.values)
    assert bool(((est.values - truth).abs() <= 5.0 * est.std_error + 1e-12).all())


def test_exact_path_per_parameter(mlp, mlp_data):
    op = hutch.HessianOperator(mlp, F.cross_entropy, mlp_data)
    est = hutch.diagonal(op, op.num_params, seed=0)
    dense = op.to_dense()
    for name in op.layout.names:
        numel = op.layout.slot(name).numel
        expected = torch.diagonal(op.block(dense, name, name).reshape(numel, numel))
        torch.testing.assert_close(est.per_parameter()[name].reshape(-1), expected)


def test_same_seed_same_values(A):
    for method in METHODS:
        first = hutch.diagonal(A, 12, method=method, seed=5)
        second = hutch.diagonal(A, 12, method=method, seed=5)
        assert torch.equal(first.values, second.values)
        assert first.seed == 5
        assert not torch.equal(first.values, hutch.diagonal(A, 12, method=method, seed=6).values)


def test_float32_operator(A):
    est = hutch.diagonal(A.float(), 20, method="xdiag", seed=0)
    assert est.values.dtype == torch.float32
    assert float(((est.values.double() - torch.diagonal(A)).abs() - 5 * est.std_error.double()).max()) <= 1e-4


# --- invalid arguments --------------------------------------------------------


def test_per_parameter_needs_layout(A):
    est = hutch.diagonal(A, 10, seed=0)
    with pytest.raises(ValueError, match="this diagonal estimate has no parameter layout"):
        est.per_parameter()
    with pytest.raises(ValueError, match="this diagonal estimate has no parameter layout"):
        est.std_error_per_parameter()


def test_rejects_unknown_method(A):
    with pytest.raises(ValueError, match=r"method must be one of \['hutchinson', 'hutchpp', 'xdiag'\]; got 'diag\+\+'"):
        hutch.diagonal(A, 10, method="diag++", seed=0)


@pytest.mark.parametrize("method, minimum", [("hutchpp", 4), ("xdiag", 4), ("hutchinson", 1)])
def test_rejects_small_budget(A, method, minimum):
    with pytest.raises(ValueError, match=rf"num_matvecs={minimum - 1} is too small for {method}, which needs at least {minimum}"):
        hutch.diagonal(A, minimum - 1, method=method, seed=0)


def test_rejects_bad_distribution_and_seed(A):
    with pytest.raises(ValueError, match=r"distribution must be one of \['rademacher', 'gaussian'\]; got 'normal'"):
        hutch.diagonal(A, 10, distribution="normal", seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int; got -1"):
        hutch.diagonal(A, N, seed=-1)
