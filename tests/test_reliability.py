"""Models beyond nn.Linear: each gets a correct Hessian or a precise error, and is left untouched.

Every expected value is a closed form, or a Hessian built with double
backward (``torch.autograd.grad`` twice) in float64.
"""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import classification_data, init_parameters
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

import hutch
from hutch._forward import batch_seed, frozen_randomness
from hutch.operator import (
    HVPFallbackWarning,
    HVPMismatchError,
    HessianOperator,
    NonFiniteHVPError,
    UnsupportedOperationError,
)

FORWARD = "forward-over-reverse"
REVERSE = "reverse-over-reverse"
ignore_fallback = pytest.mark.filterwarnings("ignore::hutch._hvp.HVPFallbackWarning")


# --- helpers --------------------------------------------------------------------


class Param(nn.Module):
    """A model that ignores its inputs and returns its one parameter ``w``."""

    def __init__(self, values):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))

    def forward(self, inputs):
        return self.w


def dummy_batch():
    return (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


def double_backward_hessian(model, loss_fn, batches, reduction="mean", seeds=None):
    """The dense Hessian from double backward over each batch, weighted like the operator.

    ``seeds[b]``, when given, seeds the forward pass of batch b as the
    operator does, so both see the same dropout masks.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    H, total = 0.0, 0
    for index, (inputs, targets) in enumerate(batches):
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if n in names}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        with sdpa_kernel(SDPBackend.MATH), frozen_randomness(seeds[index] if seeds else 0, torch.device("cpu")):
            loss = loss_fn(functional_call(model, (leaves, buffers), (inputs.clone(),)), targets)
        flat_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(leaves.values()), create_graph=True)])
        rows = [
            torch.cat([r.reshape(-1) for r in torch.autograd.grad(flat_grad[i], list(leaves.values()), retain_graph=True, allow_unused=True, materialize_grads=True)])
            for i in range(flat_grad.numel())
        ]
        weight = inputs.shape[0] if reduction == "mean" else 1
        H = H + weight * torch.stack(rows)
        total += inputs.shape[0]
    return H / total if reduction == "mean" else H


def dense_along(path, model, loss_fn, data, **kwargs):
    op = HessianOperator(model, loss_fn, data, hvp=path, **kwargs)
    return op.to_dense(), op


def squared_error(outputs, targets):
    return ((outputs - targets) ** 2).mean()


def random_block(num_rows, num_cols, seed):
    return torch.randn(num_rows, num_cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- every path against the others and against double backward -----------------


def small_conv():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    return init_parameters(model, seed=3), classification_data(5, (1, 4, 4), 3, seed=4)


def small_mlp():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return init_parameters(model, seed=0), classification_data(10, (3,), 2, seed=1)


@pytest.mark.parametrize("build", [small_mlp, small_conv], ids=["mlp", "conv"])
def test_paths_match_double_backward(build):
    model, data = build()
    reference = double_backward_hessian(model, F.cross_entropy, [data])
    H_forward, _ = dense_along(FORWARD, model, F.cross_entropy, data)
    H_reverse, op = dense_along(REVERSE, model, F.cross_entropy, data, batch_size=5)
    op._paths[REVERSE].batched = False
    H_loop = op.to_dense()
    torch.testing.assert_close(H_forward, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H_reverse, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H_loop, reference, rtol=1e-10, atol=1e-12)


def test_compare_paths_agree_on_mlp():
    model, data = small_mlp()
    op = HessianOperator(model, F.cross_entropy, data, cross_check=True)
    comparison = op.compare_paths(random_block(op.num_params, 3, seed=5))
    assert comparison.agree
    assert comparison.max_abs_diff < 1e-12
    op.matmat(random_block(op.num_params, 2, seed=6))
    # "auto" checks forward-over-reverse on the first column, then runs reverse-over-reverse.
    assert op.hvp_path == REVERSE


# --- fallbacks -----------------------------------------------------------------


def test_mse_mean_falls_back_with_one_warning():
    op = HessianOperator(Param([1.0, 2.0, 3.0]), lambda out, _: F.mse_loss(out, torch.zeros(3, dtype=torch.float64)), dummy_batch())
    with pytest.warns(HVPFallbackWarning, match=r"failed in torch.nn.functional.mse_loss.*ZeroTensors are immutable") as record:
        H = op.to_dense()
    assert len([w for w in record if w.category is HVPFallbackWarning]) == 1
    torch.testing.assert_close(H, (2.0 / 3.0) * torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.trace(H).item() == pytest.approx(2.0, abs=1e-14)
    assert op.hvp_path == REVERSE
    assert "mse_loss" in op.hvp_fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error", HVPFallbackWarning)
        op.matvec(torch.ones(3, dtype=torch.float64))


@ignore_fallback
@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.MSELoss()], ids=["functional", "module"])
def test_linear_regression_mse_trace(loss_fn):
    generator = torch.Generator().manual_seed(7)
    X = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(8, generator=generator, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    op = HessianOperator(model, lambda out, target: loss_fn(out[:, 0], target), (X, y))
    expected = (2.0 / 8.0) * float(torch.linalg.matrix_norm(X) ** 2)
    assert hutch.exact_trace(op) == pytest.approx(expected, rel=1e-12)
    assert op.hvp_path == REVERSE


@ignore_fallback
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_model_with_mse(cell):
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(2, 3, batch_first=True)
            self.head = nn.Linear(3, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = init_parameters(Recurrent().double(), seed=8)
    generator = torch.Generator().manual_seed(9)
    data = (torch.randn(4, 5, 2, generator=generator, dtype=torch.float64), torch.randn(4, 1, generator=generator, dtype=torch.float64))
    op = HessianOperator(model, F.mse_loss, data)
    V = random_block(op.num_params, 3, seed=10)
    reference = double_backward_hessian(model, F.mse_loss, [data]) @ V
    torch.testing.assert_close(op.matmat(V), reference, rtol=1e-10, atol=1e-12)
    assert op.hvp_path == REVERSE


class CubeNewStyle(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad_output


class CubeOldStyle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad_output


class ScaledSquare(torch.autograd.Function):
    """3 x² g, whose own backward reads a value with .item(), which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return 3 * x**2 * g

    @staticmethod
    def backward(ctx, grad_output):
        x, g = ctx.saved_tensors
        scale = grad_output.new_tensor(1.0 if grad_output.abs().sum().item() >= 0 else 0.0)
        return scale * 6 * x * g * grad_output, scale * 3 * x**2 * grad_output


class CubeUnbatchable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return ScaledSquare.apply(x, grad_output)


class ApplyFunction(nn.Module):
    def __init__(self, function, values):
        super().__init__()
        self.function = function
        self.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))

    def forward(self, inputs):
        return self.function.apply(self.w)


@pytest.mark.parametrize("function", [CubeNewStyle, CubeOldStyle, CubeUnbatchable])
def test_custom_function_without_jvp(function):
    op = HessianOperator(ApplyFunction(function, [1.0, -2.0, 0.5]), lambda out, _: out.sum(), dummy_batch())
    # The CPU differentiates one tangent at a time; vectorizing tries the batched pass first.
    op._paths[REVERSE].vectorize = True
    with pytest.warns(HVPFallbackWarning, match=function.__name__):
        product = op.matvec(torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(product, torch.tensor([6.0, -12.0, 3.0], dtype=torch.float64))
    assert hutch.exact_trace(op) == pytest.approx(-3.0, abs=1e-14)
    assert op.hvp_path == REVERSE
    assert op._paths[REVERSE].batched is (function is not CubeUnbatchable)


class SpatialTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.5, 0.0, 0.0, 0.0, 0.5, 0.0], dtype=torch.float64))

    def forward(self, image):
        grid = F.affine_grid(self.theta.view(1, 2, 3), (1, 1, 4, 4), align_corners=True)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def test_grid_sample_hessian_diagonal():
    image = torch.linspace(-1, 1, 5, dtype=torch.float64).expand(1, 1, 5, 5).contiguous()
    op = HessianOperator(SpatialTransformer(), lambda out, _: out.pow(2).sum(), (image, torch.zeros(1)))
    with pytest.warns(HVPFallbackWarning, match="grid_sampler_2d"):
        diagonal = hutch.exact_diagonal(op)
    expected = torch.tensor([160 / 9, 160 / 9, 32.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(diagonal, expected, rtol=1e-12, atol=1e-12)
    assert hutch.exact_trace(op) == pytest.approx(608 / 9, rel=1e-12)


# --- attention -----------------------------------------------------------------


class Attention(nn.Module):
    """Single attention over 4-D inputs (batch, heads, length, dim), fused or written out."""

    def __init__(self, explicit: bool):
        super().__init__()
        self.explicit = explicit
        self.query = nn.Linear(4, 4, bias=False)
        self.key = nn.Linear(4, 4, bias=False)
        self.value = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        if not self.explicit:
            return F.scaled_dot_product_attention(q, k, v)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return weights @ v


class SelfAttention(nn.Module):
    """nn.MultiheadAttention, or the same computation written out with the same parameters."""

    def __init__(self, explicit: bool):
        super().__init__()
        self.explicit = explicit
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        if not self.explicit:
            return self.mha(x, x, x, need_weights=False)[0]
        batch, length, embed = x.shape
        heads = self.mha.num_heads
        qkv = x @ self.mha.in_proj_weight.T + self.mha.in_proj_bias
        q, k, v = (t.reshape(batch, length, heads, embed // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(embed // heads), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, embed)
        return self.mha.out_proj(out)


@pytest.mark.parametrize("module, shape", [(Attention, (2, 2, 3, 4)), (SelfAttention, (2, 3, 4))], ids=["sdpa", "mha"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_attention_matches_explicit_softmax(module, shape, training):
    fused = init_parameters(module(explicit=False).double(), seed=11).train(training)
    explicit = module(explicit=True).double().train(training)
    explicit.load_state_dict(fused.state_dict())
    generator = torch.Generator().manual_seed(12)
    data = (torch.randn(*shape, generator=generator, dtype=torch.float64), torch.randn(*shape, generator=generator, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HVPFallbackWarning)
        op = HessianOperator(fused, squared_error, data)
        H = op.to_dense()
    reference = HessianOperator(explicit, squared_error, data).to_dense()
    torch.testing.assert_close(H, reference, rtol=1e-10, atol=1e-12)
    assert op.hvp_path == REVERSE
    assert op.hvp_fallback is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("path", [FORWARD, REVERSE])
def test_transformer_encoder_layer(training, path):
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True).double()
    layer = init_parameters(layer, seed=13).train(training)
    generator = torch.Generator().manual_seed(14)
    data = (torch.randn(2, 3, 4, generator=generator, dtype=torch.float64), torch.randn(2, 3, 4, generator=generator, dtype=torch.float64))
    op = HessianOperator(layer, squared_error, data, hvp=path)
    V = random_block(op.num_params, 2, seed=15)
    reference = double_backward_hessian(layer, squared_error, [data]) @ V
    torch.testing.assert_close(op.matmat(V), reference, rtol=1e-9, atol=1e-11)


# --- operations that support neither path --------------------------------------


class Bags(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(5, 3, mode="mean")

    def forward(self, indices):
        return self.bag(indices)


class Distances(nn.Module):
    def __init__(self, compute_mode):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
        self.points = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
        self.compute_mode = compute_mode

    def forward(self, x):
        return torch.cdist(x * self.scale, self.points, compute_mode=self.compute_mode)


class Transcriber(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, x):
        return self.proj(x).log_softmax(-1).transpose(0, 1)


def ctc(log_probs, targets):
    lengths = torch.full((targets.shape[0],), log_probs.shape[0], dtype=torch.long)
    return F.ctc_loss(log_probs, targets, lengths, torch.full_like(lengths, targets.shape[1]))


def unsupported_cases():
    generator = torch.Generator().manual_seed(16)
    bags = (torch.tensor([[0, 1], [2, 3], [4, 0]]), torch.zeros(3, 3, dtype=torch.float64))
    points = (torch.randn(5, 3, generator=generator, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64))
    sequences = (torch.randn(2, 6, 3, generator=generator, dtype=torch.float64), torch.tensor([[1, 2], [3, 1]]))
    return [
        (Bags().double(), squared_error, bags, r"_embedding_bag_backward.*Workaround: replace nn.EmbeddingBag.*nn.Embedding followed by a mean"),
        (Distances("use_mm_for_euclid_dist_if_necessary"), squared_error, points, r"_cdist_backward.*Workaround: call torch.cdist\(\.\.\., compute_mode=\"use_mm_for_euclid_dist\"\)"),
        (Transcriber().double(), ctc, sequences, r"_ctc_loss_backward.*no second derivative of the CTC loss"),
    ]


@pytest.mark.parametrize("model, loss_fn, data, message", unsupported_cases(), ids=["embedding_bag", "cdist", "ctc_loss"])
def test_unsupported_operation_raises(model, loss_fn, data, message):
    op = HessianOperator(model, loss_fn, data)
    with pytest.raises(UnsupportedOperationError, match=message):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


@ignore_fallback
def test_cdist_matrix_product_mode_works():
    generator = torch.Generator().manual_seed(17)
    data = (torch.randn(5, 3, generator=generator, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64))
    model = Distances("use_mm_for_euclid_dist")
    H = HessianOperator(model, squared_error, data).to_dense()
    forced_forward = HessianOperator(Distances("use_mm_for_euclid_dist"), squared_error, data, hvp=FORWARD)
    with pytest.raises(UnsupportedOperationError, match=r"forward-over-reverse Hessian-vector products failed in _euclidean_dist.*pass hvp='auto'"):
        forced_forward.to_dense()
    direct = double_backward_hessian(model, squared_error, [data])
    torch.testing.assert_close(H, direct, rtol=1e-10, atol=1e-12)


def test_forced_forward_path_raises_on_mse():
    op = HessianOperator(Param([1.0, 2.0]), lambda out, _: F.mse_loss(out, torch.zeros(2, dtype=torch.float64)), dummy_batch(), hvp=FORWARD)
    with pytest.raises(UnsupportedOperationError, match=r"failed in torch.nn.functional.mse_loss.*built with hvp='forward-over-reverse'; pass hvp='auto'"):
        op.to_dense()


# --- non-finite products --------------------------------------------------------


def squared_norm(outputs, targets):
    return torch.linalg.vector_norm(outputs) ** 2


def test_norm_at_zero_raises_on_reverse_path():
    op = HessianOperator(Param([0.0, 0.0, 0.0, 0.0]), squared_norm, dummy_batch(), hvp=REVERSE)
    with pytest.raises(NonFiniteHVPError, match=r"reverse-over-reverse .* data batch 0 have NaN or Inf entries for parameters \['w'\]"):
        op.to_dense()


def test_norm_at_zero_cross_check_reports_disagreement():
    op = HessianOperator(Param([0.0, 0.0, 0.0, 0.0]), squared_norm, dummy_batch(), cross_check=True)
    with pytest.raises(HVPMismatchError, match=r"disagree for parameters \['w'\].*reverse-over-reverse has NaN or Inf entries for \['w'\]"):
        op.to_dense()
    comparison = op.compare_paths(torch.eye(4, dtype=torch.float64))
    assert not comparison.agree
    assert comparison.non_finite == {FORWARD: [], REVERSE: ["w"]}


def test_norm_away_from_zero_has_trace_eight():
    op = HessianOperator(Param([1.0, -2.0, 0.5, 3.0]), squared_norm, dummy_batch(), cross_check=True)
    assert hutch.exact_trace(op) == pytest.approx(8.0, abs=1e-12)


# --- argument and data errors ---------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn, shape",
    [(lambda out, y: out, r"\(4, 1\)"), (lambda out, y: F.mse_loss(out, y, reduction="none"), r"\(4, 1\)")],
    ids=["raw_outputs", "reduction_none"],
)
def test_non_scalar_loss_states_shape(loss_fn, shape):
    data = (torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))
    op = HessianOperator(nn.Linear(2, 1).double(), loss_fn, data)
    with pytest.raises(ValueError, match=r"loss_fn must return a 0-dim \(scalar\) tensor; got " + shape + ".*never reduces a loss itself"):
        op.matvec(torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"hvp": "double-backward"}, ValueError, r"hvp must be one of \['auto', 'forward-over-reverse', 'reverse-over-reverse'\]; got 'double-backward'"),
        ({"seed": -1}, ValueError, r"seed must be None or a non-negative int; got -1"),
        ({"seed": 1.5}, ValueError, r"seed must be None or a non-negative int; got 1.5"),
        ({"cross_check": "yes"}, TypeError, r"cross_check must be True or False; got 'yes'"),
    ],
)
def test_rejects_bad_hvp_options(kwargs, error, message):
    model, data = small_mlp()
    with pytest.raises(error, match=message):
        HessianOperator(model, F.cross_entropy, data, **kwargs)


def test_frozen_parameter_left_out_and_flag_kept():
    model, data = small_mlp()
    model[0].weight.requires_grad_(False)
    op = HessianOperator(model, F.cross_entropy, data)
    assert op.layout.names == ["0.bias", "2.weight", "2.bias"]
    op.to_dense()
    assert model[0].weight.requires_grad is False


def test_tied_parameters_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2, bias=False)
            self.b = nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = init_parameters(Tied().double(), seed=18)
    data = (torch.randn(3, 2, generator=torch.Generator().manual_seed(19), dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
    op = HessianOperator(model, squared_error, data)
    assert op.layout.names == ["a.weight"]
    torch.testing.assert_close(op.to_dense(), double_backward_hessian(model, squared_error, [data]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex128])
def test_rejects_integer_and_complex_parameters(dtype):
    model = nn.Linear(2, 1).double()
    model.extra = nn.Parameter(torch.zeros(2, dtype=dtype), requires_grad=dtype.is_complex)
    with pytest.raises(TypeError, match=rf"real floating-point dtype; got \[\('extra', {dtype}\)\]"):
        HessianOperator(model, squared_error, (torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)), params=["weight", "extra"])


@pytest.mark.parametrize("data", [[], iter([])], ids=["list", "iterator"])
def test_rejects_empty_data(data):
    with pytest.raises(ValueError, match=r"data is empty; pass at least one \(inputs, targets\) batch"):
        HessianOperator(nn.Linear(2, 1).double(), squared_error, data)


def test_empty_dataloader_raises_before_sizing_chunks():
    empty = DataLoader(TensorDataset(torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 1, dtype=torch.float64)), batch_size=2)
    op = HessianOperator(nn.Linear(2, 1).double(), squared_error, empty)
    with pytest.raises(ValueError, match="data yielded no batches"):
        op.matvec(torch.ones(3, dtype=torch.float64))


def test_rejects_batch_with_mismatched_lengths():
    data = [(torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 1)), (torch.ones(3, 2, dtype=torch.float64), torch.ones(2, 1))]
    op = HessianOperator(nn.Linear(2, 1).double(), squared_error, data, batch_size=1)
    with pytest.raises(ValueError, match=r"batch 1: inputs have 3 samples \(shape \(3, 2\)\) but targets have 2"):
        op.matvec(torch.ones(3, dtype=torch.float64))


# --- model state ----------------------------------------------------------------


BN_INPUTS = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
BN_TARGETS = torch.tensor([[0.5], [-1.0], [2.0], [0.0]], dtype=torch.float64)


def buffers_of(model):
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


@pytest.mark.parametrize("path", ["auto", FORWARD, REVERSE])
@pytest.mark.parametrize("training, expected", [(True, 2 * 1.25 / (1.25 + 1e-5) + 2), (False, 2 * 7.5 / (1 + 1e-5) + 2)], ids=["train", "eval"])
def test_batch_norm_trace_and_statistics_untouched(path, training, expected):
    model = nn.BatchNorm1d(1).double().train(training)
    before = buffers_of(model)
    op = HessianOperator(model, squared_error, (BN_INPUTS, BN_TARGETS), hvp=path)
    assert hutch.exact_trace(op) == pytest.approx(expected, rel=1e-12)
    hutch.hutchinson(op, 1, seed=0)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), f"{name} changed"
        assert buffer.dtype == before[name].dtype
    assert model.training is training



class CountingLinear(nn.Linear):
    """A linear layer that counts its calls in a buffer, in place."""

    def __init__(self):
        super().__init__(2, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls.add_(1)
        return super().forward(x)


def test_buffer_written_in_forward_falls_back_and_stays():
    model = init_parameters(CountingLinear().double(), seed=26)
    data = (torch.randn(4, 2, generator=torch.Generator().manual_seed(27), dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))
    op = HessianOperator(model, squared_error, data)
    with pytest.warns(HVPFallbackWarning, match=r"aten::add_"):
        H = op.to_dense()
    torch.testing.assert_close(H, double_backward_hessian(model, squared_error, [data]), rtol=1e-12, atol=1e-13)
    assert model.calls.item() == 0.0

class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.drop = nn.Dropout(0.5)
        self.second = nn.Linear(4, 1)

    def forward(self, x):
        return self.second(self.drop(torch.tanh(self.first(x))))


def dropout_setup():
    model = init_parameters(DropoutNet().double(), seed=20)
    generator = torch.Generator().manual_seed(21)
    batches = [(torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randn(n, 1, generator=generator, dtype=torch.float64)) for n in (4, 3)]
    return model, batches


@pytest.mark.parametrize("path", [FORWARD, REVERSE])
def test_dropout_hessian_is_frozen_per_seed(path):
    model, batches = dropout_setup()
    op = HessianOperator(model, squared_error, batches, hvp=path, seed=5, batch_size=1)
    H = op.to_dense()
    seeds = [batch_seed(5, index) for index in range(len(batches))]
    torch.testing.assert_close(H, double_backward_hessian(model, squared_error, batches, seeds=seeds), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    wide = HessianOperator(model, squared_error, batches, hvp=path, seed=5, batch_size=op.num_params)
    torch.testing.assert_close(wide.to_dense(), H, rtol=1e-12, atol=1e-13)


def test_dropout_estimate_reproducible_from_estimator_seed():
    model, batches = dropout_setup()
    state = torch.get_rng_state()
    first = hutch.hutchinson(HessianOperator(model, squared_error, batches, batch_size=2), 10, seed=3)
    second = hutch.hutchinson(HessianOperator(model, squared_error, batches, batch_size=5), 10, seed=3)
    other = hutch.hutchinson(HessianOperator(model, squared_error, batches), 10, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.value == pytest.approx(second.value, rel=1e-12)
    assert other.value != pytest.approx(first.value, rel=1e-6)


def test_pinned_seed_survives_estimates():
    model, batches = dropout_setup()
    op = HessianOperator(model, squared_error, batches, seed=9)
    hutch.hutchinson(op, 4, seed=0)
    hutch.hutchpp(op, 6, seed=1)
    assert op.forward_seed == 9


def test_dropout_in_eval_mode_is_deterministic():
    model, batches = dropout_setup()
    model.eval()
    H_one = HessianOperator(model, squared_error, batches, seed=1).to_dense()
    H_two = HessianOperator(model, squared_error, batches, seed=2).to_dense()
    torch.testing.assert_close(H_one, H_two, rtol=0, atol=0)


@pytest.mark.parametrize("path", [FORWARD, REVERSE])
def test_caller_tensors_and_grads_untouched(path):
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 2)).double()
    model = init_parameters(model, seed=22)
    model[1].weight.grad = torch.full_like(model[1].weight, 0.5)
    inputs, targets = classification_data(6, (3,), 2, seed=23)
    saved_inputs, saved_grad = inputs.clone(), model[1].weight.grad.clone()
    op = HessianOperator(model, F.cross_entropy, (inputs, targets), hvp=path)
    V = random_block(op.num_params, 3, seed=24)
    saved_V = V.clone()
    product = op.matmat(V)
    assert torch.equal(inputs, saved_inputs)
    assert torch.equal(V, saved_V)
    assert torch.equal(model[1].weight.grad, saved_grad)
    assert model[1].bias.grad is None
    assert all(p.requires_grad for p in model.parameters())
    assert not product.requires_grad
    assert product.grad_fn is None


def live_tensor_count():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.mark.parametrize("path", [FORWARD, REVERSE])
def test_memory_flat_over_many_probes(path):
    model, data = small_mlp()
    op = HessianOperator(model, F.cross_entropy, data, hvp=path, batch_size=10)
    generator = torch.Generator().manual_seed(25)
    hutch.hutchinson(op, 10, generator=generator)
    before = live_tensor_count()
    for _ in range(20):
        hutch.hutchinson(op, 10, generator=generator)
    assert live_tensor_count() <= before


# --- batches of unequal size, and the recorded path ------------------------------


@ignore_fallback
def test_unequal_batches_weighted_by_size():
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [0.0], [3.0]], dtype=torch.float64)
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    trace = hutch.exact_trace(HessianOperator(model, F.mse_loss, batches))
    assert trace == pytest.approx(20 / 3, rel=1e-12)
    per_batch = [hutch.exact_trace(HessianOperator(model, F.mse_loss, batch)) for batch in batches]
    assert sum(per_batch) / 2 == pytest.approx(9.0, rel=1e-12)


@ignore_fallback
@pytest.mark.parametrize("estimator, num_matvecs", [(hutch.hutchinson, 3), (hutch.hutchpp, 6), (hutch.hutchinson, 100)], ids=["hutchinson", "hutchpp", "exact"])
def test_estimate_records_hvp_path(estimator, num_matvecs):
    model, data = small_mlp()
    estimate = estimator(HessianOperator(model, F.cross_entropy, data), num_matvecs, seed=0)
    assert estimate.info["hvp_path"] == REVERSE
    assert estimator(HessianOperator(model, F.cross_entropy, data, hvp=FORWARD), num_matvecs, seed=0).info["hvp_path"] == FORWARD
    fallback = HessianOperator(Param([1.0, 2.0, 3.0]), lambda out, _: F.mse_loss(out, torch.zeros(3, dtype=torch.float64)), dummy_batch())
    assert estimator(fallback, num_matvecs, seed=0).info["hvp_path"] == REVERSE


def test_once_differentiable_function_warns():
    class OnceCube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            return 3 * x**2 * grad_output

    op = HessianOperator(ApplyFunction(OnceCube, [1.0, 2.0]), lambda out, _: out.sum(), dummy_batch())
    with pytest.warns(HVPFallbackWarning) as record:
        op.to_dense()
    messages = [str(w.message) for w in record if w.category is HVPFallbackWarning]
    assert len(messages) == 2
    assert any("failed in custom torch.autograd.Function" in m for m in messages)
    assert any("gradient with respect to ['w'] carries no autograd graph" in m and "once_differentiable" in m for m in messages)


@pytest.mark.parametrize("path", ["auto", FORWARD, REVERSE])
def test_model_error_is_not_wrapped(path):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(3, 1)).double()
    op = HessianOperator(model, squared_error, (torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)), hvp=path)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as info:
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    assert not isinstance(info.value, UnsupportedOperationError)
