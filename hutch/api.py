"""One-line trace estimation for a model, a loss and data."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from hutch.hutchinson import hutchinson
from hutch.hutchpp import hutchpp
from hutch.operator import HessianOperator
from hutch.result import TraceEstimate

ESTIMATORS = {"hutchinson": hutchinson, "hutchpp": hutchpp}


def trace(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data,
    method: str = "hutchpp",
    num_matvecs: int = 100,
    *,
    params: Optional[Iterable[str]] = None,
    reduction: str = "mean",
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> TraceEstimate:
    """Estimate the trace of the Hessian of ``loss_fn`` over ``data`` with respect to ``model``'s parameters.

    This builds a :class:`hutch.HessianOperator` and runs one estimator on
    it. Build the operator yourself to run several estimators on one
    Hessian or to use the exact path.

    Args:
        model, loss_fn, data, params, reduction: As for
            :class:`hutch.HessianOperator`.
        method: ``"hutchpp"`` (default) or ``"hutchinson"``.
        num_matvecs: Hessian-vector products to spend; default 100.
        distribution, generator, seed: As for :func:`hutch.hutchinson`.
        batch_size: Probes per vectorized chunk of Hessian-vector products;
            ``None`` sizes chunks from the model.

    Returns:
        A :class:`hutch.TraceEstimate`.

    Raises:
        ValueError: If ``method`` is not a known estimator, and as the
            operator and the estimator raise.
    """
    if method not in ESTIMATORS:
        raise ValueError(f"method must be one of {sorted(ESTIMATORS)}; got {method!r}")
    op = HessianOperator(model, loss_fn, data, params, reduction=reduction, batch_size=batch_size)
    return ESTIMATORS[method](
        op, num_matvecs, distribution=distribution, generator=generator, seed=seed
    )
