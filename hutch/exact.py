"""Exact traces and diagonals from products with unit vectors."""

from __future__ import annotations

from typing import Optional

import torch

from hutch._sampling import (
    check_batch_size,
    check_distribution,
    check_num_matvecs,
    operator_info,
    resolve_generator,
)
from hutch.linop import OperatorLike, as_linear_operator
from hutch.result import TraceEstimate

# Unit vectors per matmat call when the caller sets no batch size.
DEFAULT_UNIT_BATCH = 64


def exact_diagonal(A: OperatorLike, *, batch_size: Optional[int] = None) -> torch.Tensor:
    """Compute the diagonal of ``A`` from products with all n unit vectors.

    The unit vectors go through ``A.matmat`` in blocks of ``batch_size``
    columns, so only one ``(n, batch_size)`` block is alive at a time; the
    matrix itself is never stored.

    Args:
        A: A square tensor or linear operator of size n.
        batch_size: Unit vectors per ``matmat`` call; default 64.

    Returns:
        A tensor of shape ``(n,)`` on ``A.device`` with ``A.dtype``.
    """
    check_batch_size(batch_size)
    if isinstance(A, torch.Tensor):
        as_linear_operator(A)
        return torch.diagonal(A).clone()
    A = as_linear_operator(A)
    n = A.shape[0]

    step = batch_size or DEFAULT_UNIT_BATCH
    diagonal = torch.empty(n, dtype=A.dtype, device=A.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        E = torch.zeros(n, stop - start, dtype=A.dtype, device=A.device)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        AE = A.matmat(E)
        diagonal[start:stop] = AE[torch.arange(start, stop), torch.arange(stop - start)]
    return diagonal


def exact_trace(A: OperatorLike, *, batch_size: Optional[int] = None) -> float:
    """Compute the exact trace of ``A`` from n products with unit vectors.

    This costs n matrix-vector products, one per row, and memory for one
    ``(n, batch_size)`` block; it never stores the matrix. For a Hessian
    operator small enough to store, ``torch.trace(op.to_dense())`` gives the
    same number from the same products.

    Args:
        A: A square tensor or linear operator of size n.
        batch_size: Unit vectors per ``matmat`` call; default 64.

    Returns:
        The trace as a Python float.

    Example:
        >>> import torch, hutch
        >>> hutch.exact_trace(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        6.0
    """
    check_batch_size(batch_size)
    if isinstance(A, torch.Tensor):
        as_linear_operator(A)
        return float(torch.trace(A))
    return float(exact_diagonal(A, batch_size=batch_size).sum())


def exact_estimate(A, method: str, batch_size: Optional[int]) -> TraceEstimate:
    """Return the exact trace as a :class:`TraceEstimate`, for estimators whose budget covers n."""
    n = A.shape[0]
    value = float(exact_diagonal(A, batch_size=batch_size).sum())
    return TraceEstimate(
        value=value, std_error=0.0, num_matvecs=n, method=method, num_samples=n, exact=True,
        info=operator_info(A),
    )


def begin_trace_estimate(
    A: OperatorLike,
    num_matvecs: int,
    method: str,
    minimum: int,
    distribution: str,
    generator: Optional[torch.Generator],
    seed: Optional[int],
    batch_size: Optional[int],
):
    """Check the arguments every trace estimator shares, and start the estimate.

    A budget that covers the dimension n is valid whatever ``minimum`` is:
    the trace is then computed exactly from n unit vectors.

    Returns:
        ``(A, generator, seed, exact)``: ``A`` as a linear operator, the
        generator to draw from and its seed, and the exact
        :class:`TraceEstimate` when ``num_matvecs >= n`` (the estimator
        returns it as it is), else ``None``.

    Raises:
        TypeError, ValueError: As the shared argument checks raise, naming
            the argument.
    """
    A = as_linear_operator(A)
    check_distribution(distribution)
    check_batch_size(batch_size)
    generator, seed = resolve_generator(generator, seed, A)
    if isinstance(num_matvecs, int) and not isinstance(num_matvecs, bool) and num_matvecs >= A.shape[0]:
        return A, generator, seed, exact_estimate(A, method, batch_size)
    check_num_matvecs(num_matvecs, minimum, method)
    return A, generator, seed, None
