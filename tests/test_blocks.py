"""Per-block traces: exact diagonal blocks of a dense Hessian, shared probes, groupings and checks."""

import pytest
import torch
from conftest import classification_data, init_parameters
from spectra import matrix_with_spectrum, spectrum
from torch import nn
from torch.nn import functional as F

import hutch

METHODS = ["hutchinson", "hutchpp", "xdiag"]


class TwoLayer(nn.Module):
    """A float64 MLP with named submodules: P = 4*6 + 6 + 6*3 + 3 = 51."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


@pytest.fixture
def op():
    model = init_parameters(TwoLayer().double(), seed=0)
    return hutch.HessianOperator(model, F.cross_entropy, classification_data(30, (4,), 3, seed=1))


@pytest.fixture
def dense(op):
    return op.to_dense()


def exact_block_trace(op, dense, names):
    total = 0.0
    for name in names:
        numel = op.layout.slot(name).numel
        total += float(torch.trace(op.block(dense, name, name).reshape(numel, numel)))
    return total


@pytest.mark.parametrize("method", METHODS)
def test_blocks_within_std_errors_of_exact(op, dense, method):
    for seed in range(3):
        parts = hutch.block_traces(op, 24, method=method, seed=seed)
        assert list(parts) == op.layout.names
        for name, est in parts.items():
            exact = exact_block_trace(op, dense, [name])
            assert abs(est.value - exact) <= 5.0 * est.std_error + 1e-12, name
            assert est.num_matvecs == 24
        assert sum(est.value for est in parts.values()) == pytest.approx(parts.total.value, rel=1e-12)
        assert abs(parts.total.value - float(torch.trace(dense))) <= 5.0 * parts.total.std_error


def test_full_budget_gives_exact_blocks(op, dense):
    parts = hutch.block_traces(op, op.num_params, blocks="module", seed=0)
    assert list(parts) == ["hidden", "out"]
    for module, est in parts.items():
        assert est.exact and est.std_error == 0.0
        assert est.value == pytest.approx(exact_block_trace(op, dense, parts.members[module]), rel=1e-10)
    assert parts.total.value == pytest.approx(float(torch.trace(dense)), rel=1e-10)


def test_hutchinson_total_equals_hutchinson(op):
    for batch_size in [None, 5]:
        parts = hutch.block_traces(op, 14, seed=4, batch_size=batch_size)
        whole = hutch.hutchinson(op, 14, seed=4, batch_size=batch_size)
        assert parts.total.value == pytest.approx(whole.value, rel=1e-12)
        assert parts.total.std_error == pytest.approx(whole.std_error, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_module_blocks_sum_parameter_blocks(op, method):
    by_parameter = hutch.block_traces(op, 20, method=method, seed=1)
    by_module = hutch.block_traces(op, 20, blocks="module", method=method, seed=1)
    assert by_module.members == {"hidden": ["hidden.weight", "hidden.bias"], "out": ["out.weight", "out.bias"]}
    for module, names in by_module.members.items():
        summed = sum(by_parameter[name].value for name in names)
        assert by_module[module].value == pytest.approx(summed, rel=1e-10)
    assert by_module.total.value == pytest.approx(by_parameter.total.value, rel=1e-12)


def test_callable_and_name_mapping_blocks(op):
    by_kind = hutch.block_traces(op, 16, blocks=lambda name: name.rpartition(".")[2], seed=2)
    explicit = hutch.block_traces(
        op, 16, blocks={"weights": ["hidden.weight", "out.weight"], "biases": ["out.bias", "hidden.bias"]}, seed=2
    )
    assert list(by_kind) == ["weight", "bias"]
    assert list(explicit) == ["weights", "biases"]
    assert explicit["weights"].value == pytest.approx(by_kind["weight"].value, rel=1e-12)
    assert explicit["biases"].info["numel"] == 9


def test_root_module_parameters(mlp, mlp_data):
    op = hutch.HessianOperator(nn.Linear(3, 2).double(), F.cross_entropy, mlp_data)
    assert list(hutch.block_traces(op, 4, blocks="module", seed=0)) == [""]


@pytest.mark.parametrize("method", METHODS)
def test_hutchpp_and_xdiag_deflation_unbiased_per_block(method):
    # Blocks of a fast-decaying matrix: a two-sided Hutch++ split would be biased per block.
    A = matrix_with_spectrum(spectrum("fast", 40), seed=3)
    blocks = {"a": slice(0, 10), "b": slice(10, 25), "c": slice(25, 40)}
    runs = [hutch.block_traces(A, 12, blocks=blocks, method=method, seed=s) for s in range(200)]
    for name, where in blocks.items():
        values = torch.tensor([r[name].value for r in runs], dtype=torch.float64)
        exact = float(torch.diagonal(A)[where].sum())
        sem = float(values.std()) / 200**0.5
        assert abs(float(values.mean()) - exact) <= 4.5 * sem + 1e-12, name


def test_index_blocks_on_tensor():
    A = matrix_with_spectrum(spectrum("slow", 20), seed=0)
    blocks = {"late": torch.arange(12, 20), "early": range(0, 5), "middle": slice(5, 12)}
    parts = hutch.block_traces(A, 20, blocks=blocks, seed=0)
    assert list(parts) == ["early", "middle", "late"]
    assert parts.members == {"early": None, "middle": None, "late": None}
    assert parts["middle"].value == pytest.approx(float(torch.diagonal(A)[5:12].sum()), rel=1e-12)
    assert parts["middle"].exact


# --- invalid arguments --------------------------------------------------------


def test_rejects_parameter_grouping_without_layout():
    A = torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"blocks='module' groups by parameter name, which needs an operator with a parameter layout.*got DenseOperator"):
        hutch.block_traces(A, 4, blocks="module", seed=0)
    with pytest.raises(ValueError, match="blocks maps names to parameter names, which needs an operator with a parameter layout"):
        hutch.block_traces(A, 4, blocks={"a": ["weight"]}, seed=0)


def test_rejects_bad_parameter_blocks(op):
    with pytest.raises(ValueError, match=r"block 'x' names parameter 'nope', which is not in the operator's layout"):
        hutch.block_traces(op, 4, blocks={"x": ["nope"]}, seed=0)
    with pytest.raises(ValueError, match=r"parameter 'out.bias' is in two blocks, 'a' and 'b'"):
        hutch.block_traces(op, 4, blocks={"a": ["out.bias"], "b": ["out.bias"]}, seed=0)
    with pytest.raises(ValueError, match=r"parameters \['hidden.bias', 'out.weight', 'out.bias'\] are in no block"):
        hutch.block_traces(op, 4, blocks={"a": ["hidden.weight"]}, seed=0)
    with pytest.raises(TypeError, match="the blocks callable must return a block name \\(str\\); it returned int 0"):
        hutch.block_traces(op, 4, blocks=lambda name: 0, seed=0)
    with pytest.raises(ValueError, match=r"blocks must be one of \['parameter', 'module'\], a callable or a mapping; got 'layer'"):
        hutch.block_traces(op, 4, blocks="layer", seed=0)
    with pytest.raises(TypeError, match="blocks must be 'parameter', 'module', a callable .* got int"):
        hutch.block_traces(op, 4, blocks=3, seed=0)
    with pytest.raises(ValueError, match="blocks is an empty mapping"):
        hutch.block_traces(op, 4, blocks={}, seed=0)


def test_rejects_bad_index_blocks():
    A = torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"flat index 3 is in two blocks, 'a' and 'b'"):
        hutch.block_traces(A, 4, blocks={"a": slice(0, 4), "b": slice(3, 6)}, seed=0)
    with pytest.raises(ValueError, match=r"1 flat indices are in no block \(the first is 5\); the blocks must cover all 6"):
        hutch.block_traces(A, 4, blocks={"a": slice(0, 5)}, seed=0)
    with pytest.raises(ValueError, match=r"block 'a' has flat indices outside \[0, 6\)"):
        hutch.block_traces(A, 4, blocks={"a": torch.tensor([0, 7])}, seed=0)
    with pytest.raises(ValueError, match="block 'a' is empty"):
        hutch.block_traces(A, 4, blocks={"a": slice(0, 0), "b": slice(0, 6)}, seed=0)
    with pytest.raises(ValueError, match="block 'a' lists a flat index more than once"):
        hutch.block_traces(A, 4, blocks={"a": torch.tensor([0, 0]), "b": slice(1, 6)}, seed=0)
    with pytest.raises(TypeError, match="block 'a' must map to a slice, a range or a 1-D integer tensor .* got float"):
        hutch.block_traces(A, 4, blocks={"a": 1.5}, seed=0)


def test_blocks_checked_before_products(counting_operator):
    op = counting_operator(torch.eye(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="flat indices are in no block"):
        hutch.block_traces(op, 4, blocks={"a": slice(0, 2)}, method="xdiag", seed=0)
    assert op.num_columns == 0
