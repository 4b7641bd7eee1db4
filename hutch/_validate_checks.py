"""Harness checks beyond the whole-model trace: per-module traces, the diagonal and the tolerance stop.

Each check compares an estimate with the exact value from the dense
Hessian's diagonal and appends a message to the case's failures when the
estimate lies outside a band of its own standard error.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

import hutch
from hutch.operator import HessianOperator

# A diagonal estimate fails when fewer of its entries than this lie within
# DIAGONAL_Z standard errors of the exact diagonal. For roughly normal
# entries about 99.7% would.
DIAGONAL_Z = 3.0
DIAGONAL_MIN_FRACTION = 0.9
# Relative accuracy the tolerance stop is asked for.
ADAPTIVE_RTOL = 0.05


def exact_rtol(dtype: torch.dtype) -> float:
    """Relative rounding error allowed between exact values: exact paths, or an estimator whose budget covered P."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def z_score(value: float, exact: float, std_error: float, rtol: float) -> float:
    """Return |value - exact| / std_error; for an exact value, 0 if it matches to ``rtol``, else inf."""
    error = abs(value - exact)
    if std_error > 0 and not math.isnan(std_error):
        return error / std_error
    return 0.0 if error <= rtol * max(abs(exact), 1.0) else math.inf


def check_blocks(
    op: HessianOperator, exact_diagonal: torch.Tensor, num_matvecs: int, seed: int, z_limit: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Estimate one trace per module and compare each with its dense diagonal block."""
    parts = hutch.block_traces(op, num_matvecs, blocks="module", seed=seed)
    rows, failures = [], []
    for name, estimate in parts.items():
        exact = sum(
            float(exact_diagonal[op.layout.slot(p).offset : op.layout.slot(p).stop].sum())
            for p in parts.members[name]
        )
        z = z_score(estimate.value, exact, estimate.std_error, exact_rtol(op.dtype))
        rows.append({"block": name or "(root)", "exact": exact, "value": estimate.value,
                     "std_error": estimate.std_error, "z": z})
        if not z <= z_limit:
            failures.append(
                f"block trace of module {name!r}: {estimate.value:.6g} ± {estimate.std_error:.3g} "
                f"is {z:.1f} standard errors from the exact {exact:.6g} (limit {z_limit:g})"
            )
    total = sum(row["value"] for row in rows)
    if abs(total - parts.total.value) > 1e-9 * max(abs(parts.total.value), 1.0):
        failures.append(
            f"block traces sum to {total:.12g}, not to the whole-model estimate "
            f"{parts.total.value:.12g} from the same probes"
        )
    return rows, failures


def check_diagonal(
    op: HessianOperator, exact_diagonal: torch.Tensor, num_matvecs: int, seed: int
) -> tuple[dict[str, Any], list[str]]:
    """Estimate the Hessian's diagonal and count entries within DIAGONAL_Z standard errors of the exact one."""
    start = time.perf_counter()
    estimate = hutch.diagonal(op, num_matvecs, seed=seed)
    seconds = time.perf_counter() - start
    exact = exact_diagonal.to(estimate.values.dtype)
    error = (estimate.values - exact).abs()
    if estimate.exact:
        within = float((error <= exact_rtol(op.dtype) * exact.abs().max().clamp_min(1.0)).double().mean())
    else:
        within = float((error <= DIAGONAL_Z * estimate.std_error).double().mean())
    summary = {
        "method": estimate.method,
        "num_matvecs": estimate.num_matvecs,
        "rel_error": float(torch.linalg.vector_norm(error) / torch.linalg.vector_norm(exact).clamp_min(1e-300)),
        "fraction_within": within,
        "seconds": seconds,
    }
    failures = []
    if within < DIAGONAL_MIN_FRACTION:
        failures.append(
            f"diagonal estimate: only {within:.1%} of entries lie within {DIAGONAL_Z:g} standard "
            f"errors of the exact diagonal (expected at least {DIAGONAL_MIN_FRACTION:.0%})"
        )
    return summary, failures


def check_adaptive(
    op: HessianOperator, exact_trace: float, max_matvecs: int, seed: int, z_limit: float
) -> tuple[dict[str, Any], list[str]]:
    """Run the tolerance-driven estimate and check it like a fixed-budget one."""
    start = time.perf_counter()
    estimate = hutch.adaptive_trace(op, rtol=ADAPTIVE_RTOL, max_matvecs=max_matvecs, seed=seed)
    seconds = time.perf_counter() - start
    z = z_score(estimate.value, exact_trace, estimate.std_error, exact_rtol(op.dtype))
    row = {
        "method": f"adaptive (rtol {ADAPTIVE_RTOL:g})",
        "value": estimate.value,
        "std_error": estimate.std_error,
        "rel_error": abs(estimate.value - exact_trace) / max(abs(exact_trace), 1e-300),
        "z": z,
        "num_matvecs": estimate.num_matvecs,
        "exact": estimate.exact,
        "seconds": seconds,
        "seed": estimate.seed,
        "converged": bool(estimate.info.get("converged", True)),
        "hvp_path": estimate.info.get("hvp_path"),
    }
    failures = []
    if not z <= z_limit:
        failures.append(
            f"adaptive estimate {estimate.value:.6g} ± {estimate.std_error:.3g} is {z:.1f} "
            f"standard errors from the exact trace {exact_trace:.6g} (limit {z_limit:g})"
        )
    return row, failures
