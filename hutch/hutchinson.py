"""Hutchinson's trace estimator."""

from __future__ import annotations

import math
from typing import Optional

import torch

from hutch._sampling import (
    operator_info,
    probe_block_size,
    sample_probes,
)
from hutch.exact import begin_trace_estimate
from hutch.linop import OperatorLike, quadratic_forms
from hutch.result import TraceEstimate


def hutchinson(
    A: OperatorLike,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> TraceEstimate:
    r"""Estimate ``tr(A)`` with Hutchinson's estimator.

    With m = ``num_matvecs`` independent probes :math:`z_i` such that
    :math:`\mathbb{E}[z z^\top] = I`,

    .. math::
        \widehat{\mathrm{tr}}(A) = \frac{1}{m} \sum_{i=1}^m z_i^\top A z_i ,

    which is unbiased. The standard error is :math:`s / \sqrt{m}` with
    :math:`s` the sample standard deviation of the terms
    :math:`z_i^\top A z_i`. Rademacher probes (entries ±1) give the smallest
    variance, :math:`2 \sum_{i \ne j} A_{ij}^2` for symmetric A; Gaussian
    probes give :math:`2 \|A\|_F^2`.

    When ``num_matvecs`` is at least the dimension n, the trace is computed
    exactly from n unit-vector products instead, with standard error 0.

    Reference: M. F. Hutchinson, "A stochastic estimator of the trace of the
    influence matrix for Laplacian smoothing splines", Communications in
    Statistics - Simulation and Computation, 1989.

    Args:
        A: A square tensor, or an operator with ``shape``, ``dtype``,
            ``device`` and ``matmat``, such as :class:`hutch.HessianOperator`.
        num_matvecs: Matrix-vector products to spend, at least 1; 2 or more
            are needed for a standard error.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: Source of the probes. Mutually exclusive with ``seed``.
        seed: Seed for a new generator on ``A.device``. With neither
            ``generator`` nor ``seed``, a seed is drawn from the operating
            system and recorded in the result.
        batch_size: Probes per ``matmat`` call; default 32, or the
            operator's ``batch_size`` when that is smaller, as for a
            :class:`hutch.HessianOperator` of a large model. The probes, and
            so the estimate, do not depend on it.

    Returns:
        A :class:`hutch.TraceEstimate`.

    Raises:
        ValueError: If ``num_matvecs`` < 1, or ``distribution`` or
            ``batch_size`` is invalid.

    Example:
        >>> import torch, hutch
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> est = hutch.hutchinson(A, 10, seed=0)
        >>> est.value  # a diagonal matrix has zero Rademacher variance
        5050.0
    """
    A, generator, seed, exact = begin_trace_estimate(
        A, num_matvecs, "hutchinson", 1, distribution, generator, seed, batch_size
    )
    if exact is not None:
        return exact
    n = A.shape[0]

    step = probe_block_size(A, batch_size)
    terms = []

    # Each block of probes is drawn, multiplied and reduced to its terms
    # z_i^T A z_i, so only one (n, step) block is alive at a time. An
    # operator with quadratic_forms reduces the products itself and never
    # keeps A Z.
    for start in range(0, num_matvecs, step):
        Z = sample_probes(n, min(step, num_matvecs - start), distribution, generator, A.dtype, A.device)
        terms.append(quadratic_forms(A, Z))
    terms = torch.cat(terms).double()

    return TraceEstimate(
        value=float(terms.mean()),
        std_error=_std_error(terms),
        num_matvecs=num_matvecs,
        method="hutchinson",
        num_samples=num_matvecs,
        seed=seed,
        info={"distribution": distribution, **operator_info(A)},
    )


def _std_error(terms: torch.Tensor) -> float:
    """Standard error of the mean of ``terms``; ``nan`` for fewer than two terms."""
    if terms.numel() < 2:
        return math.nan
    return float(terms.std(unbiased=True) / math.sqrt(terms.numel()))
