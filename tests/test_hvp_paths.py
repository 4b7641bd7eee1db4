"""Every Hessian-vector product path against double backward, and the kept gradient graph.

The reference for every product is double backward (``torch.autograd.grad``
twice, one tangent at a time) in float64. The paths under test are
forward-over-reverse, reverse-over-reverse one tangent at a time and
vectorized, ``"auto"``, each with and without a kept gradient graph.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import classification_data, init_parameters
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import hutch
from hutch._forward import batch_seed, frozen_randomness
from hutch.operator import HVP_PATHS, HessianOperator

FORWARD = "forward-over-reverse"
REVERSE = "reverse-over-reverse"
# A budget too small for any gradient graph to be kept: every call rebuilds it.
NO_GRAPH_BUDGET = 1


def double_backward_products(model, loss_fn, batches, V, seeds=None):
    """Return ``H @ V`` by double backward over each batch, batches weighted by their size."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = sum(inputs.shape[0] for inputs, _ in batches)
    HV = torch.zeros_like(V)
    for index, (inputs, targets) in enumerate(batches):
        leaves = [p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if n in names]
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        seed = seeds[index] if seeds else 0
        with sdpa_kernel(SDPBackend.MATH), frozen_randomness(seed, torch.device("cpu")):
            outputs = functional_call(model, (dict(zip(names, leaves)), buffers), (inputs.clone(),))
            loss = loss_fn(outputs, targets)
        gradients = torch.autograd.grad(loss, leaves, create_graph=True)
        for j in range(V.shape[1]):
            pieces, offset = [], 0
            for leaf in leaves:
                pieces.append(V[offset : offset + leaf.numel(), j].reshape(leaf.shape))
                offset += leaf.numel()
            rows = torch.autograd.grad(gradients, leaves, pieces, retain_graph=True, allow_unused=True, materialize_grads=True)
            HV[:, j] += inputs.shape[0] / total * torch.cat([r.reshape(-1) for r in rows])
    return HV


def random_block(num_rows, num_cols, seed):
    return torch.randn(num_rows, num_cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def squared_error(outputs, targets):
    return ((outputs - targets) ** 2).mean()


# --- the models -------------------------------------------------------------------


def mlp_case():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return init_parameters(model, seed=0), F.cross_entropy, [classification_data(9, (3,), 3, seed=1)]


def conv_case():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    return init_parameters(model, seed=2), F.cross_entropy, [classification_data(5, (1, 4, 4), 3, seed=3)]


def transformer_case():
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True).double()
    layer = init_parameters(layer, seed=4).train()
    generator = torch.Generator().manual_seed(5)
    data = (torch.randn(2, 3, 4, generator=generator, dtype=torch.float64), torch.randn(2, 3, 4, generator=generator, dtype=torch.float64))
    return layer, squared_error, [data]


def batch_norm_case():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 1)).double()
    model = init_parameters(model, seed=6).train()
    generator = torch.Generator().manual_seed(7)
    data = (torch.randn(6, 2, generator=generator, dtype=torch.float64), torch.randn(6, 1, generator=generator, dtype=torch.float64))
    return model, squared_error, [data]


def two_batch_case():
    model, loss_fn, [(inputs, targets)] = mlp_case()
    return model, loss_fn, [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]


CASES = [mlp_case, conv_case, transformer_case, batch_norm_case, two_batch_case]
CASE_IDS = ["mlp", "conv", "transformer", "batch_norm_train", "two_batches"]


def operator(model, loss_fn, batches, variant):
    """Build an operator whose products run along ``variant``."""
    path, _, rest = variant.partition(":")
    data = batches[0] if len(batches) == 1 else batches
    budget = NO_GRAPH_BUDGET if "no-graph" in rest else None
    op = HessianOperator(model, loss_fn, data, hvp=path, memory_budget=budget, batch_size=2)
    if "vectorized" in rest:
        op._paths[REVERSE].vectorize = True
    return op


VARIANTS = [
    FORWARD,
    REVERSE,
    f"{REVERSE}:vectorized",
    f"{REVERSE}:no-graph",
    f"{REVERSE}:vectorized,no-graph",
    "auto",
    "auto:no-graph",
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_path_matches_double_backward(case, variant):
    model, loss_fn, batches = case()
    op = operator(model, loss_fn, batches, variant)
    V = random_block(op.num_params, 5, seed=8)
    reference = double_backward_products(model, loss_fn, batches, V)
    scale = float(reference.abs().max())

    # Two calls, so the second one runs on a kept graph where there is one.
    for _ in range(2):
        torch.testing.assert_close(op.matmat(V), reference, rtol=1e-10, atol=1e-10 * scale)
    expected_path = REVERSE if variant.startswith("auto") else variant.partition(":")[0]
    assert op.hvp_path == expected_path


def test_paths_are_listed():
    assert HVP_PATHS == ("auto", FORWARD, REVERSE)


# --- when a gradient graph is kept --------------------------------------------------


class CountingForward(nn.Module):
    """An MLP that counts its forward passes in a Python attribute."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def counting_setup(**kwargs):
    model = init_parameters(CountingForward().double(), seed=9)
    data = classification_data(8, (3,), 2, seed=10)
    return model, data, HessianOperator(model, F.cross_entropy, data, hvp=REVERSE, **kwargs)


def test_graph_kept_across_calls_for_one_batch():
    # With a pinned forward seed, estimates do not change the seed, so they share the graph too.
    model, data, op = counting_setup(seed=3)
    V = random_block(op.num_params, 3, seed=11)
    first = op.matmat(V)
    calls = model.calls
    second = op.matmat(V)
    hutch.hutchinson(op, 6, seed=0, batch_size=2)
    assert model.calls == calls
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_each_estimate_builds_one_graph():
    model, data, op = counting_setup()
    hutch.hutchinson(op, 6, seed=0, batch_size=2)
    calls = model.calls
    hutch.hutchinson(op, 6, seed=1, batch_size=2)
    assert model.calls == calls + 1


def test_graph_rebuilt_without_budget():
    model, data, op = counting_setup(memory_budget=NO_GRAPH_BUDGET)
    V = random_block(op.num_params, 3, seed=12)
    op.matmat(V)
    calls = model.calls
    op.matmat(V)
    assert model.calls == calls + 1
    assert op._kept is None
    assert op.batch_size == 1


def test_graph_not_kept_for_several_batches():
    model, loss_fn, batches = two_batch_case()
    op = HessianOperator(model, loss_fn, batches, hvp=REVERSE)
    op.matmat(random_block(op.num_params, 2, seed=13))
    assert op._kept is None


def test_clear_cache_drops_the_graph():
    model, data, op = counting_setup()
    V = random_block(op.num_params, 2, seed=14)
    before = op.matmat(V)
    assert op._kept is not None
    op.clear_cache()
    assert op._kept is None
    calls = model.calls
    torch.testing.assert_close(op.matmat(V), before, rtol=0, atol=0)
    assert model.calls == calls + 1


def fresh_products(model, loss_fn, data, V, **kwargs):
    return HessianOperator(model, loss_fn, data, hvp=REVERSE, **kwargs).matmat(V)


@pytest.mark.parametrize("hvp", ["auto", REVERSE])
def test_optimizer_step_invalidates_graph(hvp):
    model, data, _ = counting_setup()
    op = HessianOperator(model, F.cross_entropy, data, hvp=hvp)
    V = random_block(op.num_params, 3, seed=15)
    before = op.matmat(V)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.zero_grad()
    F.cross_entropy(model(data[0]), data[1]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    after = op.matmat(V)
    torch.testing.assert_close(after, fresh_products(model, F.cross_entropy, data, V), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(after, before)


def test_replaced_parameter_invalidates_graph():
    model, data, op = counting_setup()
    V = random_block(op.num_params, 2, seed=16)
    before = op.matmat(V)
    model.net[0].weight.data = 2.0 * model.net[0].weight.data
    after = op.matmat(V)
    torch.testing.assert_close(after, fresh_products(model, F.cross_entropy, data, V), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(after, before)


def test_mode_change_invalidates_graph():
    model, loss_fn, [data] = batch_norm_case()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    op = HessianOperator(model, loss_fn, data, hvp=REVERSE)
    V = random_block(op.num_params, 3, seed=17)
    train = op.matmat(V)

    model.eval()
    evaluated = op.matmat(V)
    torch.testing.assert_close(evaluated, double_backward_products(model, loss_fn, [data], V), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(evaluated, train)

    model.train()
    torch.testing.assert_close(op.matmat(V), train, rtol=1e-12, atol=1e-14)


def test_buffer_change_invalidates_graph():
    model, loss_fn, [data] = batch_norm_case()
    model.eval()
    op = HessianOperator(model, loss_fn, data, hvp=REVERSE)
    V = random_block(op.num_params, 2, seed=18)
    before = op.matmat(V)
    with torch.no_grad():
        model[1].running_var.mul_(3.0)
    after = op.matmat(V)
    torch.testing.assert_close(after, double_backward_products(model, loss_fn, [data], V), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(after, before)


def test_data_change_in_place_invalidates_graph():
    model, data, op = counting_setup()
    V = random_block(op.num_params, 2, seed=19)
    before = op.matmat(V)
    data[0].mul_(-1.5)
    after = op.matmat(V)
    torch.testing.assert_close(after, fresh_products(model, F.cross_entropy, data, V), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(after, before)


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.drop = nn.Dropout(0.5)
        self.second = nn.Linear(4, 1)

    def forward(self, x):
        return self.second(self.drop(torch.tanh(self.first(x))))


def test_new_estimate_seed_rebuilds_graph():
    model = init_parameters(DropoutNet().double(), seed=20)
    generator = torch.Generator().manual_seed(21)
    data = (torch.randn(6, 3, generator=generator, dtype=torch.float64), torch.randn(6, 1, generator=generator, dtype=torch.float64))
    op = HessianOperator(model, squared_error, data, hvp=REVERSE)
    V = random_block(op.num_params, 3, seed=22)
    for estimator_seed in (0, 1):
        op.begin_estimate(torch.Generator().manual_seed(estimator_seed))
        seeds = [batch_seed(op.forward_seed, 0)]
        reference = double_backward_products(model, squared_error, [data], V, seeds=seeds)
        torch.testing.assert_close(op.matmat(V), reference, rtol=1e-10, atol=1e-12)


def test_auto_uses_forward_when_reverse_is_not_finite():
    class Param(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, dtype=torch.float64))

        def forward(self, inputs):
            return self.w

    def squared_norm(outputs, targets):
        return torch.linalg.vector_norm(outputs) ** 2

    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    op = HessianOperator(Param(), squared_norm, data)
    H = op.to_dense()
    forced = HessianOperator(Param(), squared_norm, data, hvp=FORWARD).to_dense()
    torch.testing.assert_close(H, forced, rtol=0, atol=0)
    assert bool(torch.isfinite(H).all())
    assert op.hvp_path == FORWARD


# --- memory ------------------------------------------------------------------------


def live_tensor_count():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.mark.parametrize("hvp", ["auto", REVERSE])
def test_memory_flat_over_many_probes_with_kept_graph(hvp):
    model, loss_fn, [data] = conv_case()
    op = HessianOperator(model, loss_fn, data, hvp=hvp)
    generator = torch.Generator().manual_seed(23)
    hutch.hutchinson(op, 8, generator=generator)
    assert op._kept is not None
    before = live_tensor_count()
    for _ in range(15):
        hutch.hutchinson(op, 8, generator=generator)
    assert live_tensor_count() <= before


# --- arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -5, 1.5, True, "1GiB"])
def test_rejects_bad_memory_budget(budget):
    model, loss_fn, [data] = mlp_case()
    with pytest.raises(ValueError, match=r"memory_budget must be None or a positive int number of bytes; got .*memory_budget=2\*\*28"):
        HessianOperator(model, loss_fn, data, memory_budget=budget)
