"""One-line trace estimation for a model, a loss and data."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from hutch.adaptive import ADAPTIVE_METHODS, DEFAULT_MAX_MATVECS, DEFAULT_MIN_SAMPLES, run_adaptive
from hutch.hutchinson import hutchinson
from hutch.hutchpp import hutchpp
from hutch.operator import HessianOperator
from hutch.result import TraceEstimate
from hutch.xtrace import xnystrace, xtrace

ESTIMATORS = {"hutchinson": hutchinson, "hutchpp": hutchpp, "xtrace": xtrace, "xnystrace": xnystrace}

# Budget of a fixed-budget run when the caller gives none.
DEFAULT_NUM_MATVECS = 100


def trace(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data,
    method: str = "hutchpp",
    num_matvecs: Optional[int] = None,
    *,
    params: Optional[Iterable[str]] = None,
    reduction: str = "mean",
    distribution: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    confidence: float = 0.95,
    max_matvecs: Optional[int] = None,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    memory_budget: Optional[int] = None,
) -> TraceEstimate:
    """Estimate the trace of the Hessian of ``loss_fn`` over ``data`` with respect to ``model``'s parameters.

    This builds a :class:`hutch.HessianOperator` and runs one estimator on
    it, in one of two modes:

    - Fixed budget (no ``rtol`` or ``atol``): spend ``num_matvecs``
      Hessian-vector products, default 100.
    - Tolerance (``rtol`` or ``atol`` given): spend products in batches
      until the ``confidence`` interval's half-width is at most
      ``atol + rtol * |estimate|``, or until ``max_matvecs`` are spent, in
      which case ``info["converged"]`` is False and a
      :class:`hutch.ToleranceWarning` is issued. See
      :func:`hutch.adaptive_trace` for the stopping rule and the adaptive
      Hutch++ budget split. Only ``"hutchpp"`` and ``"hutchinson"`` run in
      this mode.

    Build the operator yourself to run several estimators on one Hessian or
    to use the exact path.

    Args:
        model, loss_fn, data, params, reduction: As for
            :class:`hutch.HessianOperator`.
        method: ``"hutchpp"`` (default), ``"hutchinson"``, ``"xtrace"`` or
            ``"xnystrace"`` (for a Hessian known to be positive
            semi-definite).
        num_matvecs: Hessian-vector products to spend in fixed-budget mode;
            default 100. Not allowed with a tolerance, which uses
            ``max_matvecs`` instead.
        distribution: Probe distribution, ``"rademacher"`` or
            ``"gaussian"``; ``None`` uses the estimator's default.
        generator, seed: As for :func:`hutch.hutchinson`.
        batch_size: Probes per vectorized chunk of Hessian-vector products;
            ``None`` sizes chunks from the model.
        rtol: Relative tolerance on the interval half-width.
        atol: Absolute tolerance on the interval half-width.
        confidence: Coverage of the interval the tolerance applies to;
            default 0.95.
        max_matvecs: Most products a tolerance-driven run spends; default
            1000.
        min_samples: Probe terms before a tolerance-driven run may stop;
            default 30.
        memory_budget: Bytes of working memory for the products, as for
            :class:`hutch.HessianOperator`; ``None`` uses its default.

    Returns:
        A :class:`hutch.TraceEstimate`.

    Raises:
        ValueError: If ``method`` is not a known estimator, a tolerance is
            combined with ``num_matvecs`` or with a method that has no
            tolerance mode, ``max_matvecs`` is given without a tolerance,
            and as the operator and the estimator raise.
    """
    if method not in ESTIMATORS:
        raise ValueError(f"method must be one of {sorted(ESTIMATORS)}; got {method!r}")
    adaptive = rtol is not None or atol is not None
    _check_mode(adaptive, method, num_matvecs, max_matvecs)

    op = HessianOperator(
        model, loss_fn, data, params, reduction=reduction, batch_size=batch_size, memory_budget=memory_budget
    )
    options = {"generator": generator, "seed": seed}
    if distribution is not None:
        options["distribution"] = distribution

    if adaptive:
        return run_adaptive(
            op, rtol=rtol, atol=atol, confidence=confidence,
            max_matvecs=DEFAULT_MAX_MATVECS if max_matvecs is None else max_matvecs,
            method=method, min_samples=min_samples,
            distribution=options.pop("distribution", "rademacher"),
            batch_size=None, stacklevel=3, **options,
        )
    budget = DEFAULT_NUM_MATVECS if num_matvecs is None else num_matvecs
    return ESTIMATORS[method](op, budget, **options)


def _check_mode(adaptive: bool, method: str, num_matvecs, max_matvecs) -> None:
    if adaptive and num_matvecs is not None:
        raise ValueError(
            f"num_matvecs={num_matvecs!r} sets a fixed budget, which a tolerance replaces; "
            "pass max_matvecs to cap a tolerance-driven run, or drop rtol and atol"
        )
    if adaptive and method not in ADAPTIVE_METHODS:
        raise ValueError(
            f"method={method!r} has no tolerance-driven mode; use one of "
            f"{list(ADAPTIVE_METHODS)} with rtol or atol, or a fixed num_matvecs"
        )
    if not adaptive and max_matvecs is not None:
        raise ValueError(
            f"max_matvecs={max_matvecs!r} only caps a tolerance-driven run; pass rtol or "
            "atol with it, or use num_matvecs for a fixed budget"
        )
