"""The contract every trace estimator meets: inputs, dtypes, determinism, budget and the exact case.

Add a new estimator to ``ESTIMATORS``; it must accept
``(A, num_matvecs, *, distribution, generator, seed, batch_size)`` and return
a :class:`hutch.TraceEstimate` whose ``method`` is the function's name.
"""

import math

import pytest
import torch
from spectra import matrix_with_spectrum, spectrum
from torch.nn import functional as F

import hutch

ESTIMATORS = [hutch.hutchinson, hutch.hutchpp, hutch.xtrace]

# A budget every estimator accepts and that stays below the dimension N.
BUDGET = 12
N = 60

pytestmark = pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda f: f.__name__)


@pytest.fixture
def A():
    return matrix_with_spectrum(spectrum("slow", N), seed=0)


@pytest.fixture
def exact():
    return float(spectrum("slow", N).sum())


def test_returns_trace_estimate(estimator, A, exact):
    est = estimator(A, BUDGET, seed=0)
    assert isinstance(est, hutch.TraceEstimate)
    assert est.method == estimator.__name__
    assert isinstance(est.value, float)
    assert isinstance(float(est), float)
    assert est.num_matvecs == BUDGET
    assert not est.exact
    assert math.isfinite(est.std_error)
    assert est.std_error > 0
    assert est.num_samples >= 2
    assert abs(est.value - exact) <= 5.0 * est.std_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved(estimator, A, exact, counting_operator, dtype):
    # counting_operator asserts every block passed to matmat has the operator's dtype.
    op = counting_operator(A.to(dtype))
    est = estimator(op, BUDGET, seed=1)
    assert isinstance(est.value, float)
    assert abs(est.value - exact) <= 5.0 * est.std_error + 1e-4 * exact

    direct = estimator(A.to(dtype), BUDGET, seed=1)
    assert direct.value == pytest.approx(est.value, rel=1e-6)


def test_any_operator_object(estimator, A, counting_operator):
    # Same seed, same probes: the tensor and a wrapper of it give the same number.
    from_tensor = estimator(A, BUDGET, seed=2)
    from_operator = estimator(counting_operator(A), BUDGET, seed=2)
    assert from_operator.value == pytest.approx(from_tensor.value, rel=1e-12)
    assert from_operator.std_error == pytest.approx(from_tensor.std_error, rel=1e-10)


def test_hessian_operator(estimator, mlp, mlp_data):
    op = hutch.HessianOperator(mlp, F.cross_entropy, mlp_data)
    est = estimator(op, BUDGET, seed=3)
    assert est.num_matvecs == BUDGET
    assert abs(est.value - hutch.exact_trace(op)) <= 5.0 * est.std_error


def test_same_seed_same_value(estimator, A):
    first = estimator(A, BUDGET, seed=4)
    second = estimator(A, BUDGET, seed=4)
    assert first.value == second.value
    assert first.std_error == second.std_error
    assert first.seed == 4


def test_different_seeds_differ(estimator, A):
    values = {estimator(A, BUDGET, seed=seed).value for seed in range(5)}
    assert len(values) == 5


def test_generator_state_decides(estimator, A):
    first = estimator(A, BUDGET, generator=torch.Generator().manual_seed(5))
    second = estimator(A, BUDGET, generator=torch.Generator().manual_seed(5))
    assert first.value == second.value
    assert first.seed is None

    # One generator advances between calls, so the second call draws new probes.
    generator = torch.Generator().manual_seed(5)
    assert estimator(A, BUDGET, generator=generator).value != estimator(A, BUDGET, generator=generator).value


def test_recorded_seed_reproduces(estimator, A):
    first = estimator(A, BUDGET)
    assert isinstance(first.seed, int)
    assert estimator(A, BUDGET, seed=first.seed).value == first.value
    assert estimator(A, BUDGET).seed != first.seed


@pytest.mark.parametrize("source", ["seed", "generator", "none"])
def test_global_rng_untouched(estimator, A, source):
    kwargs = {"seed": {"seed": 0}, "generator": {"generator": torch.Generator().manual_seed(0)}, "none": {}}[source]
    state = torch.get_rng_state()
    estimator(A, BUDGET, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("num_matvecs", [6, BUDGET, 31, N - 1])
@pytest.mark.parametrize("batch_size", [None, 1, 5])
def test_budget_accounting(estimator, A, counting_operator, num_matvecs, batch_size):
    op = counting_operator(A)
    est = estimator(op, num_matvecs, seed=6, batch_size=batch_size)
    assert est.num_matvecs == num_matvecs
    assert op.num_columns == num_matvecs
    if batch_size is not None:
        assert max(op.calls) <= batch_size


@pytest.mark.parametrize("num_matvecs", [N, N + 1, 3 * N])
def test_exact_at_full_budget(estimator, A, exact, counting_operator, num_matvecs):
    op = counting_operator(A)
    est = estimator(op, num_matvecs, seed=7)
    assert est.exact
    assert est.std_error == 0.0
    assert est.num_matvecs == N
    assert op.num_columns == N
    assert est.value == pytest.approx(exact, rel=1e-12)
    assert est.confidence_interval() == (est.value, est.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor(estimator, A, exact):
    est = estimator(A.cuda(), BUDGET, seed=8)
    assert abs(est.value - exact) <= 5.0 * est.std_error
    assert estimator(A.cuda(), BUDGET, seed=8).value == est.value


# --- invalid arguments --------------------------------------------------------


def test_rejects_non_square_tensor(estimator):
    with pytest.raises(ValueError, match=r"A must be a square matrix of shape \(n, n\); got a tensor of shape \(4, 5\)"):
        estimator(torch.zeros(4, 5, dtype=torch.float64), BUDGET, seed=0)
    with pytest.raises(ValueError, match=r"got a tensor of shape \(4,\)"):
        estimator(torch.zeros(4, dtype=torch.float64), BUDGET, seed=0)


def test_rejects_non_square_operator(estimator):
    class Rectangular:
        shape = (4, 5)
        dtype = torch.float64
        device = torch.device("cpu")

        def matmat(self, V):
            return V

    with pytest.raises(ValueError, match=r"A must be square; got an operator of shape \(4, 5\)"):
        estimator(Rectangular(), BUDGET, seed=0)


def test_rejects_object_without_matmat(estimator, A):
    class NoProducts:
        shape = (N, N)
        dtype = torch.float64
        device = torch.device("cpu")

    with pytest.raises(TypeError, match=r"A must be a square torch.Tensor or a linear operator.*got NoProducts, which lacks \['matmat'\]"):
        estimator(NoProducts(), BUDGET, seed=0)
    with pytest.raises(TypeError, match=r"got ndarray, which lacks"):
        estimator(A.numpy(), BUDGET, seed=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex128])
def test_rejects_non_real_float_dtype(estimator, dtype):
    with pytest.raises(TypeError, match=rf"A must have a real floating-point dtype; got {dtype}"):
        estimator(torch.eye(N, dtype=dtype), BUDGET, seed=0)


def test_rejects_integer_operator(estimator, counting_operator):
    op = counting_operator(torch.eye(N, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"A must have a real floating-point dtype; got torch.int32. Convert it"):
        estimator(op, BUDGET, seed=0)


@pytest.mark.parametrize("distribution", ["normal", "Rademacher", None])
def test_rejects_bad_distribution(estimator, A, distribution):
    with pytest.raises(ValueError, match=r"distribution must be one of \['rademacher', 'gaussian'\]; got"):
        estimator(A, BUDGET, seed=0, distribution=distribution)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
@pytest.mark.parametrize("num_matvecs", [BUDGET, N])
def test_rejects_bad_seed(estimator, A, seed, num_matvecs):
    with pytest.raises(ValueError, match=rf"seed must be a non-negative int; got {seed!r}"):
        estimator(A, num_matvecs, seed=seed)


def test_rejects_generator_and_seed(estimator, A):
    with pytest.raises(ValueError, match="pass either generator or seed, not both; got generator=.* and seed=3"):
        estimator(A, BUDGET, seed=3, generator=torch.Generator())


def test_rejects_non_generator(estimator, A):
    with pytest.raises(TypeError, match="generator must be a torch.Generator; got int. Pass seed=<int>"):
        estimator(A, BUDGET, generator=3)


@pytest.mark.parametrize("batch_size", [0, -4, 2.5, True])
def test_rejects_bad_batch_size(estimator, A, batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be None or a positive int; got {batch_size!r}"):
        estimator(A, BUDGET, seed=0, batch_size=batch_size)


def test_rejects_non_int_budget(estimator, A):
    with pytest.raises(TypeError, match="num_matvecs must be an int; got float 12.0"):
        estimator(A, 12.0, seed=0)


def test_rejects_zero_budget(estimator, A):
    with pytest.raises(ValueError, match=rf"num_matvecs=0 is too small for {estimator.__name__}"):
        estimator(A, 0, seed=0)
