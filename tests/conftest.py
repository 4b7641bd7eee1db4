"""Shared fixtures: small float64 models with data, and seed sweeps for statistical tests.

Statistical tolerances are derived from the sample itself. A check passes
when a difference is within ``z`` times its own estimated standard error,
with ``z`` between 4 and 5, so a correct estimator fails with probability
well below one in ten thousand. Fixed seeds make every run identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

# The test matrices and models are small, so intra-op threads only add
# synchronisation, which costs milliseconds per product on a busy machine.
torch.set_num_threads(1)


def init_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with N(0, 0.5^2) entries from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def classification_data(num_samples: int, shape: tuple, num_classes: int, seed: int):
    """Return float64 inputs of ``(num_samples, *shape)`` and integer class targets."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, *shape, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return inputs, targets


@pytest.fixture
def mlp():
    """An MLP with biases, P = 4*3 + 4 + 2*4 + 2 = 26, in float64."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return init_parameters(model, seed=0)


@pytest.fixture
def mlp_data():
    return classification_data(10, (3,), 2, seed=1)


@dataclass
class SeedSweep:
    """Values and reported standard errors of one estimator over many seeds."""

    values: np.ndarray
    std_errors: np.ndarray

    @property
    def num_seeds(self) -> int:
        return self.values.size

    @property
    def spread(self) -> float:
        """Sample standard deviation of the values across seeds."""
        return float(self.values.std(ddof=1))

    def assert_unbiased(self, exact: float, z: float = 4.5, rounding: float = 1e-10) -> None:
        """Assert the mean over seeds is within ``z`` standard errors of ``exact``.

        The standard error of the mean is the spread over seeds divided by
        the square root of the number of seeds. ``rounding`` absorbs float64
        error when the spread is zero.
        """
        mean = float(self.values.mean())
        sem = self.spread / math.sqrt(self.num_seeds)
        assert abs(mean - exact) <= z * sem + rounding, (
            f"mean {mean:.6g} over {self.num_seeds} seeds differs from the exact trace "
            f"{exact:.6g} by {abs(mean - exact):.3g}, more than {z} x {sem:.3g}"
        )

    def assert_honest_std_error(self, z: float = 4.5) -> None:
        """Assert the root-mean-square reported std_error matches the spread across seeds.

        Both sides are estimates. The relative standard error of a sample
        standard deviation over N draws of kurtosis k is about
        ``sqrt((k - 1) / N) / 2``, and likewise for the root mean of the
        squared standard errors, so the tolerance is ``z`` times their
        combined relative error.
        """
        reported = float(np.sqrt(np.mean(self.std_errors**2)))
        spread = self.spread
        values_rel = 0.5 * math.sqrt((_kurtosis(self.values) - 1.0) / self.num_seeds)
        squares = self.std_errors**2
        squares_rel = 0.5 * float(squares.std(ddof=1) / squares.mean()) / math.sqrt(self.num_seeds)
        tolerance = z * math.hypot(values_rel, squares_rel)
        assert abs(math.log(reported / spread)) <= tolerance, (
            f"reported std_error {reported:.4g} (root mean square over {self.num_seeds} seeds) "
            f"differs from the spread {spread:.4g} across seeds by more than a relative "
            f"{tolerance:.3f}"
        )


def _kurtosis(x: np.ndarray) -> float:
    """Sample kurtosis E[(x - mean)^4] / Var(x)^2 (3 for a normal distribution)."""
    centred = x - x.mean()
    return float(np.mean(centred**4) / np.mean(centred**2) ** 2)


@pytest.fixture
def sweep_seeds() -> Callable[..., SeedSweep]:
    """Return ``run(estimator, A, num_matvecs, num_seeds, **kwargs)`` over seeds 0..num_seeds-1."""

    def run(estimator, A, num_matvecs: int, num_seeds: int, **kwargs) -> SeedSweep:
        estimates = [estimator(A, num_matvecs, seed=seed, **kwargs) for seed in range(num_seeds)]
        return SeedSweep(
            values=np.array([e.value for e in estimates]),
            std_errors=np.array([e.std_error for e in estimates]),
        )

    return run


class CountingOperator:
    """Wrap a square matrix and record the number of columns of every ``matmat`` call."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.calls: list[int] = []

    @property
    def num_columns(self) -> int:
        return sum(self.calls)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        assert V.ndim == 2, f"matmat got shape {tuple(V.shape)}"
        assert V.shape[0] == self.shape[0], f"matmat got shape {tuple(V.shape)}"
        assert V.dtype == self.dtype, f"matmat got dtype {V.dtype}, operator is {self.dtype}"
        self.calls.append(V.shape[1])
        return self.matrix @ V


@pytest.fixture
def counting_operator() -> Callable[[torch.Tensor], CountingOperator]:
    return CountingOperator
