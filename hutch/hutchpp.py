"""Hutch++: Hutchinson's estimator after deflating a low-rank sketch."""

from __future__ import annotations

from typing import Optional

import torch

from hutch._sampling import (
    chunked_matmat,
    operator_info,
    probe_block_size,
    sample_probes,
)
from hutch.exact import begin_trace_estimate
from hutch.hutchinson import _std_error
from hutch.linop import OperatorLike, quadratic_forms
from hutch.result import TraceEstimate

# Hutch++ needs one sketch column, its product, and two residual probes.
MIN_MATVECS = 4


def hutchpp(
    A: OperatorLike,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> TraceEstimate:
    r"""Estimate ``tr(A)`` with Hutch++.

    Hutch++ splits the budget m = ``num_matvecs`` into three parts. With
    k = ⌊m / 3⌋:

    1. Sketch: draw a random n × k matrix S and compute ``Q = orth(A S)``
       (k products), an orthonormal basis that captures A's dominant
       eigenvectors.
    2. Deflated trace: compute :math:`\mathrm{tr}(Q^\top A Q)` exactly
       (k products).
    3. Residual: estimate :math:`\mathrm{tr}((I - QQ^\top) A (I - QQ^\top))`
       with Hutchinson on the remaining r = m - 2k probes projected onto
       the complement of Q.

    .. math::
        \widehat{\mathrm{tr}}(A) = \mathrm{tr}(Q^\top A Q)
            + \frac{1}{r} \sum_{i=1}^{r} g_i^\top (I - QQ^\top) A (I - QQ^\top) g_i .

    The two traces add up to tr(A) for any orthonormal Q, so the estimate
    is unbiased given the sketch. Its standard error is the sample standard
    deviation of the r residual terms over :math:`\sqrt{r}`. Given the
    sketch, the first term is exact and carries no error, so this is the
    standard error of the whole estimate, conditional on S. When A has
    rank at most k, the residual vanishes and the estimate is exact up to
    rounding. Where A's spectrum decays fast, the error falls like 1/m
    instead of Hutchinson's :math:`1/\sqrt{m}`. Where it decays slowly, the
    sketch buys little and Hutch++ can be less accurate than Hutchinson at
    the same budget.

    When ``num_matvecs`` is at least the dimension n, the trace is computed
    exactly from n unit-vector products instead, with standard error 0.

    Reference: R. A. Meyer, C. Musco, C. Musco and D. P. Woodruff,
    "Hutch++: Optimal Stochastic Trace Estimation", Symposium on
    Simplicity in Algorithms (SOSA), 2021.

    Args:
        A: A square tensor, or an operator with ``shape``, ``dtype``,
            ``device`` and ``matmat``, such as :class:`hutch.HessianOperator`.
        num_matvecs: Matrix-vector products to spend, at least 4 (one sketch
            column, its product, two residual probes) unless it covers n.
        distribution: ``"rademacher"`` or ``"gaussian"``, for both the sketch
            and the residual probes.
        generator: Source of the sketch and probes. Mutually exclusive with
            ``seed``.
        seed: Seed for a new generator on ``A.device``. With neither
            ``generator`` nor ``seed``, a seed is drawn from the operating
            system and recorded in the result.
        batch_size: Vectors per ``matmat`` call; default 32, or the
            operator's ``batch_size`` when that is smaller. The sketch is
            drawn whole, so it needs memory for k vectors whatever this is.

    Returns:
        A :class:`hutch.TraceEstimate` whose ``info`` holds
        ``sketch_size`` (k), ``residual_probes`` (r) and ``deflated_trace``
        (:math:`\mathrm{tr}(Q^\top A Q)`).

    Raises:
        ValueError: If ``num_matvecs`` < 4 and below n, or ``distribution``
            or ``batch_size`` is invalid.

    Example:
        >>> import torch, hutch
        >>> U = torch.linalg.qr(torch.randn(50, 3, dtype=torch.float64,
        ...     generator=torch.Generator().manual_seed(0)))[0]
        >>> A = U @ torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)) @ U.T
        >>> round(hutch.hutchpp(A, 12, seed=0).value, 8)  # rank 3 <= k = 4
        8.0
    """
    A, generator, seed, exact = begin_trace_estimate(
        A, num_matvecs, "hutchpp", MIN_MATVECS, distribution, generator, seed, batch_size
    )
    if exact is not None:
        return exact
    n = A.shape[0]

    step = probe_block_size(A, batch_size)
    k = num_matvecs // 3
    r = num_matvecs - 2 * k

    # Sketch the range of A: Q is an orthonormal basis of A S.
    S = sample_probes(n, k, distribution, generator, A.dtype, A.device)
    Q, _ = torch.linalg.qr(chunked_matmat(A, S, step))
    del S

    # Trace of the part of A inside span(Q), exactly.
    deflated_trace = float(torch.sum(Q * chunked_matmat(A, Q, step)).double())

    # Hutchinson on the rest: each probe is projected onto the complement of Q.
    terms = []
    for start in range(0, r, step):
        G = sample_probes(n, min(step, r - start), distribution, generator, A.dtype, A.device)
        G = G - Q @ (Q.T @ G)
        terms.append(quadratic_forms(A, G))
    terms = torch.cat(terms).double()

    return TraceEstimate(
        value=deflated_trace + float(terms.mean()),
        std_error=_std_error(terms),
        num_matvecs=num_matvecs,
        method="hutchpp",
        num_samples=r,
        seed=seed,
        info={
            "distribution": distribution,
            "sketch_size": k,
            "residual_probes": r,
            "deflated_trace": deflated_trace,
            **operator_info(A),
        },
    )
