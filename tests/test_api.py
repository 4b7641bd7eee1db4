"""hutch.trace: the one-line call against the exact Hessian trace and the estimators it wraps."""

import pytest
import torch
from conftest import classification_data, init_parameters
from torch import nn
from torch.nn import functional as F

import hutch


@pytest.fixture
def model():
    # P = 5*8 + 8 + 8*3 + 3 = 75.
    return init_parameters(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double(), seed=0)


@pytest.fixture
def data():
    return classification_data(24, (5,), 3, seed=1)


@pytest.fixture
def exact(model, data):
    return hutch.exact_trace(hutch.HessianOperator(model, F.cross_entropy, data))


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_within_few_std_errors_of_exact(model, data, exact, method):
    for seed in range(5):
        est = hutch.trace(model, F.cross_entropy, data, method=method, num_matvecs=30, seed=seed)
        assert est.method == method
        assert est.num_matvecs == 30
        assert est.seed == seed
        assert abs(est.value - exact) <= 5.0 * est.std_error


@pytest.mark.parametrize("method, estimator", [("hutchinson", hutch.hutchinson), ("hutchpp", hutch.hutchpp)])
def test_equals_estimator_on_operator(model, data, method, estimator):
    op = hutch.HessianOperator(model, F.cross_entropy, data)
    expected = estimator(op, 12, seed=3, distribution="gaussian")
    est = hutch.trace(model, F.cross_entropy, data, method=method, num_matvecs=12, seed=3, distribution="gaussian")
    assert est.value == pytest.approx(expected.value, rel=1e-12)
    assert est.std_error == pytest.approx(expected.std_error, rel=1e-10)


def test_default_method_is_hutchpp(model, data):
    assert hutch.trace(model, F.cross_entropy, data, num_matvecs=12, seed=0).method == "hutchpp"


def test_full_budget_is_exact(model, data, exact):
    est = hutch.trace(model, F.cross_entropy, data, method="hutchinson", num_matvecs=75, seed=0)
    assert est.exact
    assert est.std_error == 0.0
    assert est.value == pytest.approx(exact, rel=1e-12)


def test_passes_params_and_reduction(model, data):
    batches = [(data[0][:10], data[1][:10]), (data[0][10:], data[1][10:])]
    op = hutch.HessianOperator(model, F.cross_entropy, batches, params=["2.bias"], reduction="sum")
    est = hutch.trace(
        model, F.cross_entropy, batches, method="hutchpp", num_matvecs=3, params=["2.bias"], reduction="sum"
    )
    assert est.exact
    assert est.value == pytest.approx(hutch.exact_trace(op), rel=1e-12)


def test_generator_and_batch_size_pass_through(model, data):
    first = hutch.trace(model, F.cross_entropy, data, num_matvecs=12, generator=torch.Generator().manual_seed(7))
    second = hutch.trace(
        model, F.cross_entropy, data, num_matvecs=12, generator=torch.Generator().manual_seed(7), batch_size=2
    )
    assert first.seed is None
    assert second.value == pytest.approx(first.value, rel=1e-10)


def test_rejects_unknown_method(model, data):
    with pytest.raises(ValueError, match=r"method must be one of \['hutchinson', 'hutchpp', 'xnystrace', 'xtrace'\]; got 'lanczos'"):
        hutch.trace(model, F.cross_entropy, data, method="lanczos")


def test_passes_on_operator_and_estimator_errors(model, data):
    with pytest.raises(ValueError, match="reduction must be one of"):
        hutch.trace(model, F.cross_entropy, data, reduction="none")
    with pytest.raises(ValueError, match="num_matvecs=2 is too small for hutchpp"):
        hutch.trace(model, F.cross_entropy, data, num_matvecs=2, seed=0)
    with pytest.raises(ValueError, match="pass either generator or seed, not both"):
        hutch.trace(model, F.cross_entropy, data, seed=0, generator=torch.Generator())


def test_rejects_budget_with_tolerance(model, data):
    with pytest.raises(ValueError, match="num_matvecs=20 sets a fixed budget, which a tolerance replaces; pass max_matvecs"):
        hutch.trace(model, F.cross_entropy, data, num_matvecs=20, rtol=0.1)


def test_rejects_tolerance_for_fixed_only_method(model, data):
    with pytest.raises(ValueError, match="method='xtrace' has no tolerance-driven mode; use one of"):
        hutch.trace(model, F.cross_entropy, data, method="xtrace", atol=0.1)


def test_rejects_max_matvecs_without_tolerance(model, data):
    with pytest.raises(ValueError, match="max_matvecs=50 only caps a tolerance-driven run; pass rtol or atol"):
        hutch.trace(model, F.cross_entropy, data, max_matvecs=50)


def test_default_budget_covers_small_model(model, data, exact):
    # The default budget of 100 products covers P = 75, so the result is exact.
    est = hutch.trace(model, F.cross_entropy, data, seed=0)
    assert est.exact
    assert est.value == pytest.approx(exact, rel=1e-12)


def test_memory_budget_reaches_the_operator(model, data, monkeypatch):
    built = []

    class Recording(hutch.HessianOperator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(hutch.api, "HessianOperator", Recording)
    default = hutch.trace(model, F.cross_entropy, data, method="hutchinson", num_matvecs=12, seed=4)
    tight = hutch.trace(model, F.cross_entropy, data, method="hutchinson", num_matvecs=12, seed=4, memory_budget=1)
    assert built[0].memory_budget is None
    assert built[1].memory_budget == 1
    # A one-byte budget drops the kept graph and the forward-mode check, but not the products.
    assert built[1].batch_size == 1
    assert tight.value == pytest.approx(default.value, rel=1e-12)


def test_invalid_memory_budget_names_the_argument(model, data):
    with pytest.raises(ValueError, match=r"memory_budget must be None or a positive int number of bytes; got 0"):
        hutch.trace(model, F.cross_entropy, data, memory_budget=0)
