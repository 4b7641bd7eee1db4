"""HessianOperator against float64 references: torch.func.hessian, double backward, batching."""

import numpy as np
import pytest
import torch
from conftest import classification_data, init_parameters
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hutch
from hutch import HessianOperator


def reference_hessian(model, loss_fn, inputs, targets, names):
    """Return ``torch.func.hessian``'s nested blocks for the parameters ``names``."""
    named = dict(model.named_parameters())
    params = {name: named[name].detach().clone() for name in names}
    fixed = {name: p.detach() for name, p in named.items() if name not in params}
    fixed.update(dict(model.named_buffers()))

    def loss_of(p):
        return loss_fn(functional_call(model, (p, fixed), (inputs,)), targets)

    return torch.func.hessian(loss_of)(params)


def assert_dense_matches_reference(op, nested):
    """Compare ``op.to_dense()`` with nested reference blocks, assembled and block by block."""
    H = op.to_dense()
    assert H.shape == (op.num_params, op.num_params)
    assert H.dtype == torch.float64
    torch.testing.assert_close(H, op.layout.from_nested(nested), rtol=1e-10, atol=1e-12)

    blocks = op.layout.to_nested(H)
    for a in op.layout.names:
        for b in op.layout.names:
            torch.testing.assert_close(op.layout.block(H, a, b), nested[a][b], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(blocks[a][b], nested[a][b], rtol=1e-10, atol=1e-12)


def random_vectors(num_params, k, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_params, k, generator=generator, dtype=torch.float64)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, kernel_size=3)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class FrozenNet(nn.Module):
    """An MLP whose first weight is frozen and whose output is shifted by a buffer."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)
        self.first.weight.requires_grad_(False)
        self.register_buffer("shift", torch.tensor([0.3, -0.2]))

    def forward(self, x):
        return self.second(torch.tanh(self.first(x))) + self.shift


class ScaledLinear(nn.Module):
    """A linear layer followed by a learnable 0-dim temperature."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.linear(x) * self.temperature


class TiedNet(nn.Module):
    """Two linear layers that share one weight, which named_parameters() lists once, as a.weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


# --- dense Hessian against torch.func.hessian --------------------------------


def test_linear_cross_entropy_blocks_and_trace():
    model = init_parameters(nn.Linear(2, 2).double(), seed=0)
    inputs, targets = classification_data(6, (2,), 2, seed=1)
    op = HessianOperator(model, F.cross_entropy, (inputs, targets))
    nested = reference_hessian(model, F.cross_entropy, inputs, targets, ["weight", "bias"])

    assert op.shape == (6, 6)
    assert op.layout.names == ["weight", "bias"]
    assert nested["weight"]["weight"].shape == (2, 2, 2, 2)
    assert nested["weight"]["bias"].shape == (2, 2, 2)
    assert nested["bias"]["weight"].shape == (2, 2, 2)
    assert nested["bias"]["bias"].shape == (2, 2)
    assert_dense_matches_reference(op, nested)

    expected = torch.diagonal(nested["weight"]["weight"].reshape(4, 4)).sum() + torch.diagonal(
        nested["bias"]["bias"]
    ).sum()
    assert hutch.exact_trace(op) == pytest.approx(float(expected), rel=1e-12)
    assert float(torch.trace(op.to_dense())) == pytest.approx(float(expected), rel=1e-12)


def test_mlp_with_biases_matches_reference(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    nested = reference_hessian(mlp, F.cross_entropy, *mlp_data, op.layout.names)
    assert op.num_params == 26
    assert_dense_matches_reference(op, nested)


def test_conv_model_matches_reference():
    model = init_parameters(ConvNet().double(), seed=2)
    inputs, targets = classification_data(4, (2, 5, 5), 3, seed=3)
    op = HessianOperator(model, F.cross_entropy, (inputs, targets))
    assert op.layout.names == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    assert op.num_params == 2 * 2 * 9 + 2 + 18 * 3 + 3
    nested = reference_hessian(model, F.cross_entropy, inputs, targets, op.layout.names)
    assert_dense_matches_reference(op, nested)


def test_frozen_parameter_excluded_by_default():
    model = init_parameters(FrozenNet().double(), seed=4)
    model.first.weight.requires_grad_(False)
    inputs, targets = classification_data(8, (3,), 2, seed=5)
    op = HessianOperator(model, F.cross_entropy, (inputs, targets))
    assert op.layout.names == ["first.bias", "second.weight", "second.bias"]
    nested = reference_hessian(model, F.cross_entropy, inputs, targets, op.layout.names)
    assert_dense_matches_reference(op, nested)


def test_frozen_parameter_included_when_named():
    model = init_parameters(FrozenNet().double(), seed=4)
    model.first.weight.requires_grad_(False)
    inputs, targets = classification_data(8, (3,), 2, seed=5)
    op = HessianOperator(model, F.cross_entropy, (inputs, targets), params=["first.weight"])
    assert op.layout.names == ["first.weight"]
    nested = reference_hessian(model, F.cross_entropy, inputs, targets, ["first.weight"])
    assert_dense_matches_reference(op, nested)


def test_explicit_params_subset_uses_model_order(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data, params=["2.weight", "0.bias"])
    assert op.layout.names == ["0.bias", "2.weight"]
    assert op.num_params == 4 + 8
    nested = reference_hessian(mlp, F.cross_entropy, *mlp_data, ["0.bias", "2.weight"])
    assert_dense_matches_reference(op, nested)


def test_scalar_parameter_matches_reference():
    model = init_parameters(ScaledLinear().double(), seed=6)
    inputs, targets = classification_data(7, (3,), 2, seed=7)
    op = HessianOperator(model, F.cross_entropy, (inputs, targets))
    assert op.layout.slot("temperature").shape == ()
    nested = reference_hessian(model, F.cross_entropy, inputs, targets, op.layout.names)
    assert_dense_matches_reference(op, nested)


def test_tied_parameter_counted_once():
    model = init_parameters(TiedNet().double(), seed=8)
    inputs, targets = classification_data(6, (3,), 3, seed=9)
    op = HessianOperator(model, F.cross_entropy, (inputs, targets))
    assert op.layout.names == ["a.weight", "a.bias", "b.bias"]

    # Reference: the shared weight enters both layers.
    def loss_of(p):
        hidden = torch.tanh(F.linear(inputs, p["a.weight"], p["a.bias"]))
        return F.cross_entropy(F.linear(hidden, p["a.weight"], p["b.bias"]), targets)

    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert_dense_matches_reference(op, torch.func.hessian(loss_of)(params))


# --- products ----------------------------------------------------------------


def double_backward(model, loss_fn, inputs, targets, op, V):
    """Return H V column by column with torch.autograd.grad(create_graph=True)."""
    named = dict(model.named_parameters())
    params = [named[name] for name in op.layout.names]
    columns = []
    for v in V.T:
        loss = loss_fn(model(inputs), targets)
        gradients = torch.autograd.grad(loss, params, create_graph=True)
        pieces = op.layout.split(v)
        gv = sum((g * pieces[name]).sum() for g, name in zip(gradients, op.layout.names))
        hv = torch.autograd.grad(gv, params)
        columns.append(torch.cat([h.reshape(-1) for h in hv]))
    return torch.stack(columns, dim=1)


def test_products_match_double_backward(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    V = random_vectors(op.num_params, 5, seed=10)
    expected = double_backward(mlp, F.cross_entropy, *mlp_data, op, V)

    torch.testing.assert_close(op.matmat(V), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(V[:, 2]), expected[:, 2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V[:, 0], expected[:, 0], rtol=1e-10, atol=1e-12)
    assert (op @ V[:, 0]).shape == (op.num_params,)


def test_conv_products_match_double_backward():
    model = init_parameters(ConvNet().double(), seed=2)
    inputs, targets = classification_data(4, (2, 5, 5), 3, seed=3)
    op = HessianOperator(model, F.cross_entropy, (inputs, targets))
    V = random_vectors(op.num_params, 3, seed=11)
    expected = double_backward(model, F.cross_entropy, inputs, targets, op, V)
    torch.testing.assert_close(op.matmat(V), expected, rtol=1e-10, atol=1e-12)


def test_matmat_equals_matvec_columns(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    V = random_vectors(op.num_params, 7, seed=12)
    columns = torch.stack([op.matvec(v.contiguous()) for v in V.T], dim=1)
    torch.testing.assert_close(op.matmat(V), columns, rtol=1e-12, atol=1e-14)


def test_matmat_with_no_columns(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    out = op.matmat(torch.zeros(op.num_params, 0, dtype=torch.float64))
    assert out.shape == (op.num_params, 0)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_batch_size_does_not_change_products(mlp, mlp_data, batch_size):
    V = random_vectors(26, 6, seed=13)
    default = HessianOperator(mlp, F.cross_entropy, mlp_data).matmat(V)
    chunked = HessianOperator(mlp, F.cross_entropy, mlp_data, batch_size=batch_size)
    assert chunked.batch_size == batch_size
    torch.testing.assert_close(chunked.matmat(V), default, rtol=1e-12, atol=1e-14)


def test_default_batch_size_is_positive(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    assert isinstance(op.batch_size, int)
    assert op.batch_size >= 1


def test_operator_follows_parameter_updates(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    before = op.to_dense()
    with torch.no_grad():
        mlp[0].weight.mul_(2.0)
    after = op.to_dense()
    nested = reference_hessian(mlp, F.cross_entropy, *mlp_data, op.layout.names)
    torch.testing.assert_close(after, op.layout.from_nested(nested), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(before, after)


def test_hessian_is_symmetric(mlp, mlp_data):
    H = HessianOperator(mlp, F.cross_entropy, mlp_data).to_dense()
    torch.testing.assert_close(H, H.T, rtol=1e-10, atol=1e-12)


# --- several batches ---------------------------------------------------------


@pytest.fixture
def uneven_batches():
    inputs, targets = classification_data(20, (3,), 2, seed=14)
    sizes = [7, 3, 10]
    return list(zip(inputs.split(sizes), targets.split(sizes))), (inputs, targets)


def test_list_of_batches_equals_concatenated_mean(mlp, uneven_batches):
    batches, full = uneven_batches
    V = random_vectors(26, 4, seed=15)
    expected = HessianOperator(mlp, F.cross_entropy, full).matmat(V)
    op = HessianOperator(mlp, F.cross_entropy, batches)
    torch.testing.assert_close(op.matmat(V), expected, rtol=1e-10, atol=1e-12)


def test_generator_of_batches_is_read_once(mlp, uneven_batches):
    batches, full = uneven_batches
    V = random_vectors(26, 4, seed=16)
    expected = HessianOperator(mlp, F.cross_entropy, full).matmat(V)
    op = HessianOperator(mlp, F.cross_entropy, (batch for batch in batches))
    # A second product must still see every batch.
    torch.testing.assert_close(op.matmat(V), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(V), expected, rtol=1e-10, atol=1e-12)


def test_dataloader_equals_concatenated_mean(mlp, uneven_batches):
    _, full = uneven_batches
    loader = DataLoader(TensorDataset(*full), batch_size=7, shuffle=False)
    V = random_vectors(26, 4, seed=17)
    expected = HessianOperator(mlp, F.cross_entropy, full).matmat(V)
    op = HessianOperator(mlp, F.cross_entropy, loader)
    torch.testing.assert_close(op.matmat(V), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.to_dense(), HessianOperator(mlp, F.cross_entropy, full).to_dense())


def test_sum_reduction_adds_batch_hessians(mlp, uneven_batches):
    batches, _ = uneven_batches
    op = HessianOperator(mlp, F.cross_entropy, batches, reduction="sum")
    expected = sum(HessianOperator(mlp, F.cross_entropy, batch).to_dense() for batch in batches)
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-10, atol=1e-12)


def test_summed_loss_with_sum_reduction(mlp, uneven_batches):
    batches, (inputs, targets) = uneven_batches

    def summed(outputs, y):
        return F.cross_entropy(outputs, y, reduction="sum")

    op = HessianOperator(mlp, summed, batches, reduction="sum")
    nested = reference_hessian(mlp, summed, inputs, targets, op.layout.names)
    torch.testing.assert_close(op.to_dense(), op.layout.from_nested(nested), rtol=1e-10, atol=1e-12)


# --- conversions and the exact path -----------------------------------------


def test_to_scipy_top_eigenvalue(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    expected = torch.linalg.eigvalsh(op.to_dense())[-1].item()
    scipy_op = op.to_scipy()
    assert scipy_op.shape == (26, 26)
    assert scipy_op.dtype == np.float64

    v0 = np.ones(26)
    (top,), _ = eigsh(scipy_op, k=1, which="LA", v0=v0, tol=1e-12)
    assert top == pytest.approx(expected, rel=1e-8, abs=1e-12)


def test_to_scipy_products_are_numpy(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    V = random_vectors(26, 3, seed=18)
    scipy_op = op.to_scipy()
    out_vec = scipy_op.matvec(V[:, 0].numpy())
    out_mat = scipy_op.matmat(V.numpy())
    assert isinstance(out_vec, np.ndarray)
    assert out_vec.shape == (26,)
    np.testing.assert_allclose(out_vec, op.matvec(V[:, 0].contiguous()).numpy(), rtol=1e-12)
    np.testing.assert_allclose(out_mat, op.matmat(V).numpy(), rtol=1e-12)


def test_to_dense_respects_max_bytes(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    needed = 26 * 26 * 8
    assert op.to_dense(max_bytes=needed).shape == (26, 26)
    with pytest.raises(ValueError, match=r"26 x 26 matrix of torch.float64.*above max_bytes=5407.*Pass a larger max_bytes"):
        op.to_dense(max_bytes=needed - 1)


def test_float32_model_gives_float32_operator(mlp_data):
    model = init_parameters(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), seed=0)
    inputs, targets = mlp_data
    op = HessianOperator(model, F.cross_entropy, (inputs.float(), targets))
    assert op.dtype == torch.float32
    H = op.to_dense()
    assert H.dtype == torch.float32
    reference = HessianOperator(model.double(), F.cross_entropy, (inputs, targets)).to_dense()
    torch.testing.assert_close(H.double(), reference, rtol=1e-4, atol=1e-5)


def test_split_flatten_and_repr(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    v = random_vectors(26, 1, seed=19)[:, 0]
    parts = op.split(v)
    assert parts["0.weight"].shape == (4, 3)
    torch.testing.assert_close(op.flatten(parts), v)
    H = op.to_dense()
    torch.testing.assert_close(op.block(H, "2.bias", "0.weight"), op.layout.block(H, "2.bias", "0.weight"))
    assert "num_params=26" in repr(op)
    assert "reduction='mean'" in repr(op)


# --- the model is left as it was ---------------------------------------------


def snapshot(model, tensors):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "data": [t.clone() for t in tensors],
        "data_requires_grad": [t.requires_grad for t in tensors],
    }


def assert_same_snapshot(before, after):
    for kind in ("params", "buffers", "grads"):
        assert before[kind].keys() == after[kind].keys()
        for name, tensor in before[kind].items():
            if tensor is None:
                assert after[kind][name] is None, f"{kind} {name} was None and is now set"
            else:
                assert torch.equal(after[kind][name], tensor), f"{kind} {name} changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["data_requires_grad"] == before["data_requires_grad"]
    for old, new in zip(before["data"], after["data"]):
        assert torch.equal(old, new)


def test_model_state_untouched():
    model = init_parameters(FrozenNet().double(), seed=20)
    inputs, targets = classification_data(8, (3,), 2, seed=21)
    model.second.weight.grad = torch.full_like(model.second.weight, 0.25)
    model.first.bias.grad = torch.full_like(model.first.bias, -1.0)
    before = snapshot(model, [inputs, targets])

    op = HessianOperator(model, F.cross_entropy, (inputs, targets))
    V = random_vectors(op.num_params, 3, seed=22)
    op.matmat(V)
    op.matvec(V[:, 0].contiguous())
    op.to_dense()
    op.to_scipy().matvec(np.ones(op.num_params))
    hutch.exact_trace(op)
    hutch.hutchinson(op, 4, seed=0)
    hutch.hutchpp(op, 6, seed=0)

    assert_same_snapshot(before, snapshot(model, [inputs, targets]))
    assert model.second.weight.grad is not None
    assert model.second.bias.grad is None


# --- invalid arguments --------------------------------------------------------


def test_rejects_non_module(mlp_data):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got function"):
        HessianOperator(lambda x: x, F.cross_entropy, mlp_data)


def test_rejects_non_callable_loss(mlp, mlp_data):
    with pytest.raises(TypeError, match="loss_fn must be callable.*got str"):
        HessianOperator(mlp, "cross_entropy", mlp_data)


@pytest.mark.parametrize("reduction", ["none", "Mean", None])
def test_rejects_bad_reduction(mlp, mlp_data, reduction):
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'sum'\]; got"):
        HessianOperator(mlp, F.cross_entropy, mlp_data, reduction=reduction)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True, "4"])
def test_rejects_bad_batch_size(mlp, mlp_data, batch_size):
    with pytest.raises(ValueError, match="batch_size must be None or a positive int; got"):
        HessianOperator(mlp, F.cross_entropy, mlp_data, batch_size=batch_size)


def test_rejects_non_scalar_loss_reduction_none(mlp, mlp_data):
    def per_sample(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    op = HessianOperator(mlp, per_sample, mlp_data)
    with pytest.raises(ValueError, match=r"loss_fn must return a 0-dim \(scalar\) tensor; got \(10,\)"):
        op.matvec(torch.ones(26, dtype=torch.float64))


def test_rejects_raw_model_outputs_as_loss(mlp, mlp_data):
    op = HessianOperator(mlp, lambda outputs, targets: outputs, mlp_data)
    with pytest.raises(ValueError, match=r"0-dim \(scalar\) tensor; got \(10, 2\).*\.mean\(\)"):
        op.matmat(torch.ones(26, 2, dtype=torch.float64))


def test_rejects_loss_that_is_not_a_tensor(mlp, mlp_data):
    op = HessianOperator(mlp, lambda outputs, targets: 1.0, mlp_data)
    with pytest.raises(ValueError, match=r"0-dim \(scalar\) tensor; got float"):
        op.matvec(torch.ones(26, dtype=torch.float64))


def test_rejects_unknown_parameter_name(mlp, mlp_data):
    with pytest.raises(ValueError, match=r"parameter '1.weight' is not a parameter of the model; available names are \['0.weight'"):
        HessianOperator(mlp, F.cross_entropy, mlp_data, params=["0.weight", "1.weight"])


def test_rejects_params_as_string(mlp, mlp_data):
    with pytest.raises(TypeError, match=r"not a single string; got '0.weight'. Use params=\['0.weight'\]"):
        HessianOperator(mlp, F.cross_entropy, mlp_data, params="0.weight")


def test_rejects_non_string_param_name(mlp, mlp_data):
    with pytest.raises(TypeError, match="params must contain parameter names .str.; got Parameter"):
        HessianOperator(mlp, F.cross_entropy, mlp_data, params=[mlp[0].weight])


def test_rejects_duplicate_param_names(mlp, mlp_data):
    with pytest.raises(ValueError, match=r"params names \['0.bias'\] more than once"):
        HessianOperator(mlp, F.cross_entropy, mlp_data, params=["0.bias", "2.bias", "0.bias"])


def test_rejects_empty_params(mlp, mlp_data):
    with pytest.raises(ValueError, match="params is empty; name at least one parameter"):
        HessianOperator(mlp, F.cross_entropy, mlp_data, params=[])


def test_rejects_model_without_trainable_parameters(mlp, mlp_data):
    mlp.requires_grad_(False)
    with pytest.raises(ValueError, match="model has no parameter with requires_grad=True; pass params"):
        HessianOperator(mlp, F.cross_entropy, mlp_data)


def test_rejects_tied_parameter_second_name():
    model = TiedNet().double()
    data = classification_data(4, (3,), 3, seed=0)
    with pytest.raises(ValueError, match="parameter 'b.weight' is tied to 'a.weight'.*use 'a.weight' in params"):
        HessianOperator(model, F.cross_entropy, data, params=["b.weight"])


def test_rejects_integer_parameter(mlp, mlp_data):
    mlp.register_parameter("step", nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False))
    with pytest.raises(TypeError, match=r"real floating-point dtype; got \[\('step', torch.int64\)\]"):
        HessianOperator(mlp, F.cross_entropy, mlp_data, params=["0.bias", "step"])


def test_rejects_mixed_dtypes(mlp, mlp_data):
    mlp[2].float()
    with pytest.raises(TypeError, match="selected parameters have mixed dtypes.*model.double()"):
        HessianOperator(mlp, F.cross_entropy, mlp_data)


def test_rejects_several_devices(mlp, mlp_data):
    # The meta device serves as a second device, so the check runs without CUDA.
    mlp.register_parameter("offset", nn.Parameter(torch.zeros(2, dtype=torch.float64, device="meta")))
    with pytest.raises(TypeError, match=r"selected parameters are on several devices.*model.to\(device\)"):
        HessianOperator(mlp, F.cross_entropy, mlp_data)


@pytest.mark.parametrize(
    "vector, error, message",
    [
        (torch.ones(25, dtype=torch.float64), ValueError, r"v has shape \(25,\); expected \(P,\) with P = 26"),
        (torch.ones(26, 1, dtype=torch.float64), ValueError, r"v has shape \(26, 1\); expected \(P,\)"),
        (torch.ones(26), TypeError, r"v has dtype torch.float32 on cpu; the operator works in torch.float64"),
        (np.ones(26), TypeError, r"v must be a torch.Tensor of shape \(P,\); got ndarray"),
    ],
)
def test_matvec_rejects_bad_vector(mlp, mlp_data, vector, error, message):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    with pytest.raises(error, match=message):
        op.matvec(vector)


@pytest.mark.parametrize(
    "block, error, message",
    [
        (torch.ones(25, 3, dtype=torch.float64), ValueError, r"V has shape \(25, 3\); expected \(P, k\) with P = 26"),
        (torch.ones(26, dtype=torch.float64), ValueError, r"V has shape \(26,\); expected \(P, k\)"),
        (torch.ones(26, 3, dtype=torch.int64), TypeError, r"V has dtype torch.int64.*V.to\(dtype=op.dtype"),
        ([[1.0]], TypeError, r"V must be a torch.Tensor of shape \(P, k\); got list"),
    ],
)
def test_matmat_rejects_bad_block(mlp, mlp_data, block, error, message):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    with pytest.raises(error, match=message):
        op.matmat(block)


def test_matmul_rejects_wrong_length(mlp, mlp_data):
    op = HessianOperator(mlp, F.cross_entropy, mlp_data)
    with pytest.raises(ValueError, match=r"v has shape \(3,\)"):
        op @ torch.ones(3, dtype=torch.float64)


# --- invalid data -------------------------------------------------------------


def product(model, data, **kwargs):
    op = HessianOperator(model, F.cross_entropy, data, **kwargs)
    return op.matvec(torch.ones(op.num_params, dtype=torch.float64))


@pytest.mark.parametrize("data", [[], iter([])])
def test_rejects_empty_data(mlp, data):
    with pytest.raises(ValueError, match=r"data is empty; pass at least one \(inputs, targets\) batch"):
        HessianOperator(mlp, F.cross_entropy, data)


@pytest.mark.parametrize("data", [3, torch.ones(4, 3)])
def test_rejects_data_that_is_not_batches(mlp, data):
    with pytest.raises(TypeError, match=r"data must be an \(inputs, targets\) pair of tensors or an iterable"):
        HessianOperator(mlp, F.cross_entropy, data)


def test_empty_dataloader_given_batch_size(mlp):
    empty = TensorDataset(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="data yielded no batches"):
        product(mlp, DataLoader(empty, batch_size=4), batch_size=2)


def test_empty_dataloader_default_batch_size(mlp):
    # Sizing the default chunk reads the first batch, which must raise the same error.
    empty = TensorDataset(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="data yielded no batches"):
        product(mlp, DataLoader(empty, batch_size=4))


def test_rejects_length_mismatch(mlp):
    inputs, targets = classification_data(6, (3,), 2, seed=0)
    with pytest.raises(ValueError, match=r"batch 0: inputs have 6 samples .* but targets have 5"):
        product(mlp, (inputs, targets[:5]))


def test_rejects_empty_batch(mlp):
    inputs, targets = classification_data(6, (3,), 2, seed=0)
    batches = [(inputs, targets), (inputs[:0], targets[:0])]
    with pytest.raises(ValueError, match=r"batch 1 is empty \(inputs of shape \(0, 3\)\)"):
        product(mlp, batches)


def test_rejects_scalar_inputs(mlp):
    with pytest.raises(ValueError, match=r"batch 0: inputs must have a leading sample dimension.*inputs\[None\]"):
        product(mlp, [(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0))])


def test_rejects_non_tensor_batch_members(mlp):
    inputs, targets = classification_data(6, (3,), 2, seed=0)
    with pytest.raises(TypeError, match=r"batch 1: inputs and targets must be tensors; got \(Tensor, list\)"):
        product(mlp, [(inputs, targets), (inputs, targets.tolist())])


@pytest.mark.parametrize(
    "bad, message",
    [
        ("triple", r"batch 1 must be an \(inputs, targets\) pair; got tuple of length 3"),
        ("dict", r"batch 1 must be an \(inputs, targets\) pair; got dict"),
    ],
)
def test_rejects_batch_that_is_not_a_pair(mlp, bad, message):
    inputs, targets = classification_data(6, (3,), 2, seed=0)
    second = (inputs, targets, targets) if bad == "triple" else {"x": inputs, "y": targets}
    with pytest.raises(TypeError, match=message):
        product(mlp, [(inputs, targets), second])
