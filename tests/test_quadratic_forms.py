"""quadratic_forms: v^T H v per column without holding H V, checked against the dense Hessian."""

import warnings

import pytest
import torch
from conftest import classification_data, init_parameters
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hutch
from hutch import HessianOperator
from hutch.linop import quadratic_forms
from hutch.operator import HVPFallbackWarning, NonFiniteHVPError

FORWARD = "forward-over-reverse"
REVERSE = "reverse-over-reverse"


def mlp_and_data(num_samples=12):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return init_parameters(model, seed=0), classification_data(num_samples, (3,), 2, seed=1)


def columns(num_params, k, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_params, k, generator=generator, dtype=torch.float64)


def expected_forms(H, V):
    return torch.einsum("ik,ij,jk->k", V, H, V)


@pytest.mark.parametrize("hvp", ["auto", FORWARD, REVERSE])
@pytest.mark.parametrize("batching", ["one batch", "three batches", "data loader"])
def test_forms_match_dense_hessian(hvp, batching):
    model, (inputs, targets) = mlp_and_data()
    if batching == "one batch":
        data = (inputs, targets)
    elif batching == "three batches":
        # Unequal batches: the forms must be weighted by batch size like matmat.
        data = [(inputs[:5], targets[:5]), (inputs[5:7], targets[5:7]), (inputs[7:], targets[7:])]
    else:
        data = DataLoader(TensorDataset(inputs, targets), batch_size=5)
    H = HessianOperator(model, F.cross_entropy, (inputs, targets), hvp=REVERSE).to_dense()
    op = HessianOperator(model, F.cross_entropy, data, hvp=hvp, batch_size=2)
    V = columns(op.num_params, 5, seed=3)

    forms = op.quadratic_forms(V)

    assert forms.shape == (5,)
    assert forms.dtype == torch.float64
    torch.testing.assert_close(forms, expected_forms(H, V), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(forms, (V * op.matmat(V)).sum(dim=0), rtol=1e-12, atol=1e-13)


def test_forms_with_sum_reduction_add_the_batches_unweighted():
    model, (inputs, targets) = mlp_and_data()
    batches = [(inputs[:9], targets[:9]), (inputs[9:], targets[9:])]
    V = columns(26, 3, seed=4)
    per_batch = [
        HessianOperator(model, F.cross_entropy, batch, hvp=REVERSE).to_dense() for batch in batches
    ]
    op = HessianOperator(model, F.cross_entropy, batches, reduction="sum")
    expected = expected_forms(per_batch[0] + per_batch[1], V)
    torch.testing.assert_close(op.quadratic_forms(V), expected, rtol=1e-12, atol=1e-13)


def test_forms_of_no_columns_are_empty():
    model, data = mlp_and_data()
    op = HessianOperator(model, F.cross_entropy, data)
    assert op.quadratic_forms(torch.zeros(op.num_params, 0, dtype=torch.float64)).shape == (0,)


def test_forms_leave_the_model_untouched():
    model, data = mlp_and_data()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    op = HessianOperator(model, F.cross_entropy, data)
    op.quadratic_forms(columns(op.num_params, 2, seed=5))
    for name, p in model.named_parameters():
        assert p.grad is None
        assert torch.equal(p.detach(), before[name])


def test_forms_reject_a_wrong_shape():
    model, data = mlp_and_data()
    op = HessianOperator(model, F.cross_entropy, data)
    with pytest.raises(ValueError, match=r"V has shape \(5, 2\); expected \(P, k\) with P = 26"):
        op.quadratic_forms(torch.zeros(5, 2, dtype=torch.float64))


class Param(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))

    def forward(self, inputs):
        return self.w


def squared_norm(outputs, targets):
    # The gradient of ||w||^2 through the norm is 0/0 at w = 0 on the reverse path.
    return torch.linalg.vector_norm(outputs) ** 2


def test_non_finite_forms_name_the_parameter():
    batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    op = HessianOperator(Param([0.0, 0.0, 0.0]), squared_norm, batch, hvp=REVERSE)
    with pytest.raises(NonFiniteHVPError, match=r"data batch 0 have NaN or Inf entries for parameters \['w'\]"):
        op.quadratic_forms(torch.ones(3, 2, dtype=torch.float64))


def test_hutchinson_matches_dense_matrix():
    model, data = mlp_and_data()
    op = HessianOperator(model, F.cross_entropy, data)
    from_operator = hutch.hutchinson(op, 20, seed=11)
    from_matrix = hutch.hutchinson(op.to_dense(), 20, seed=11)
    assert from_operator.value == pytest.approx(from_matrix.value, rel=1e-12)
    assert from_operator.std_error == pytest.approx(from_matrix.std_error, rel=1e-10)


class CountingOperator:
    """A dense matrix that counts the calls to each of its methods."""

    def __init__(self, matrix, forms=None):
        self.matrix = matrix
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device
        self.forms = forms
        self.calls = {"matmat": 0, "quadratic_forms": 0}

    def matmat(self, V):
        self.calls["matmat"] += 1
        return self.matrix @ V

    def quadratic_forms(self, V):
        self.calls["quadratic_forms"] += 1
        return self.forms(V) if self.forms else torch.einsum("ik,ij,jk->k", V, self.matrix, V)


def test_hutchinson_uses_an_operators_quadratic_forms():
    matrix = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    A = CountingOperator(matrix)
    estimate = hutch.hutchinson(A, 6, seed=0, batch_size=4)
    assert A.calls == {"matmat": 0, "quadratic_forms": 2}
    assert estimate.value == pytest.approx(36.0, rel=1e-14)


def test_wrong_shape_forms_raise():
    A = CountingOperator(torch.eye(4, dtype=torch.float64), forms=lambda V: torch.zeros(3))
    with pytest.raises(ValueError, match=r"CountingOperator.quadratic_forms returned \(3,\) for 2 columns; it must return a tensor of shape \(2,\)"):
        quadratic_forms(A, torch.ones(4, 2, dtype=torch.float64))


def test_operators_without_quadratic_forms_are_reduced_from_matmat():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    V = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    A = hutch.linop.DenseOperator(matrix)
    torch.testing.assert_close(quadratic_forms(A, V), expected_forms(matrix, V), rtol=1e-14, atol=1e-14)


# --- the forward-over-reverse check of hvp="auto" and the memory budget -------------


def mse_model_and_data():
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(8, generator=generator, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    return model, (inputs, targets), lambda out, y: F.mse_loss(out[:, 0], y)


def test_auto_skips_forward_check_under_budget():
    model, data, loss_fn = mse_model_and_data()
    op = HessianOperator(model, loss_fn, data, memory_budget=1)
    # Forward mode fails on MSE in torch 2.13; without the check there is no attempt to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error", HVPFallbackWarning)
        H = op.to_dense()
    assert op.hvp_path == REVERSE
    assert op.hvp_fallback is None
    X = data[0]
    torch.testing.assert_close(H, (2.0 / 8.0) * X.T @ X, rtol=1e-12, atol=1e-14)


def test_auto_checks_forward_mode_by_default():
    model, data, loss_fn = mse_model_and_data()
    op = HessianOperator(model, loss_fn, data)
    with pytest.warns(HVPFallbackWarning, match="mse_loss"):
        op.matvec(torch.ones(3, dtype=torch.float64))
    assert op.hvp_path == REVERSE


def test_hutchpp_reduces_its_residual_with_quadratic_forms():
    matrix = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    A = CountingOperator(matrix)
    estimate = hutch.hutchpp(A, 12, seed=0, batch_size=4)
    assert A.calls["quadratic_forms"] == 1
    assert A.calls["matmat"] == 2
    assert estimate.num_matvecs == 12


def test_adaptive_hutchinson_calls_only_quadratic_forms():
    matrix = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    A = CountingOperator(matrix)
    estimate = hutch.adaptive_trace(A, rtol=0.5, method="hutchinson", seed=0, batch_size=4)
    assert A.calls["matmat"] == 0
    assert A.calls["quadratic_forms"] >= 1
    # A diagonal matrix has zero Rademacher variance: every term is the trace.
    assert estimate.value == pytest.approx(820.0, rel=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forms_on_cuda_match_the_cpu():
    # On a GPU the reverse-over-reverse path batches its tangents with is_grads_batched.
    model, (inputs, targets) = mlp_and_data()
    V = columns(26, 4, seed=6)
    expected = HessianOperator(model, F.cross_entropy, (inputs, targets)).quadratic_forms(V)
    cuda = torch.device("cuda")
    op = HessianOperator(model.to(cuda), F.cross_entropy, (inputs.to(cuda), targets.to(cuda)))
    torch.testing.assert_close(op.quadratic_forms(V.to(cuda)).cpu(), expected, rtol=1e-10, atol=1e-12)
