"""exact_trace and exact_diagonal against dense matrices and the dense Hessian."""

import pytest
import torch
from spectra import matrix_with_spectrum, spectrum
from torch.nn import functional as F

import hutch


@pytest.fixture
def A():
    return matrix_with_spectrum(spectrum("indefinite", 70), seed=3)


def test_tensor_trace_and_diagonal(A):
    assert hutch.exact_trace(A) == pytest.approx(float(spectrum("indefinite", 70).sum()), rel=1e-12)
    torch.testing.assert_close(hutch.exact_diagonal(A), torch.diagonal(A))


def test_exact_diagonal_of_tensor_is_a_copy(A):
    diagonal = hutch.exact_diagonal(A)
    diagonal.zero_()
    assert torch.diagonal(A).abs().sum() > 0


@pytest.mark.parametrize("batch_size", [None, 1, 7, 70, 500])
def test_operator_path_matches_tensor(A, counting_operator, batch_size):
    op = counting_operator(A)
    torch.testing.assert_close(hutch.exact_diagonal(op, batch_size=batch_size), torch.diagonal(A))
    assert op.num_columns == 70
    if batch_size is not None:
        assert max(op.calls) <= batch_size

    op = counting_operator(A)
    assert hutch.exact_trace(op, batch_size=batch_size) == pytest.approx(float(torch.trace(A)), rel=1e-12)
    assert op.num_columns == 70


def test_float32_operator(A, counting_operator):
    op = counting_operator(A.float())
    diagonal = hutch.exact_diagonal(op)
    assert diagonal.dtype == torch.float32
    torch.testing.assert_close(diagonal, torch.diagonal(A).float())


def test_hessian_trace_and_diagonal(mlp, mlp_data):
    op = hutch.HessianOperator(mlp, F.cross_entropy, mlp_data)
    H = op.to_dense()
    assert hutch.exact_trace(op) == pytest.approx(float(torch.trace(H)), rel=1e-12)
    torch.testing.assert_close(hutch.exact_diagonal(op), torch.diagonal(H), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hutch.exact_diagonal(op, batch_size=5), torch.diagonal(H), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("function", [hutch.exact_trace, hutch.exact_diagonal])
def test_rejects_non_square_tensor(function):
    with pytest.raises(ValueError, match=r"A must be a square matrix of shape \(n, n\); got a tensor of shape \(3, 4\)"):
        function(torch.zeros(3, 4))


@pytest.mark.parametrize("function", [hutch.exact_trace, hutch.exact_diagonal])
def test_rejects_integer_tensor(function):
    with pytest.raises(TypeError, match=r"A must have a real floating-point dtype; got torch.int64.*\.double\(\)"):
        function(torch.eye(3, dtype=torch.int64))


@pytest.mark.parametrize("function", [hutch.exact_trace, hutch.exact_diagonal])
def test_rejects_object_without_matmat(function):
    with pytest.raises(TypeError, match=r"got list, which lacks \['shape', 'dtype', 'device', 'matmat'\]"):
        function([[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("function", [hutch.exact_trace, hutch.exact_diagonal])
@pytest.mark.parametrize("batch_size", [0, -3, 1.5, True])
def test_rejects_bad_batch_size(A, counting_operator, function, batch_size):
    with pytest.raises(ValueError, match="batch_size must be None or a positive int; got"):
        function(counting_operator(A), batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size must be None or a positive int; got"):
        function(A, batch_size=batch_size)
