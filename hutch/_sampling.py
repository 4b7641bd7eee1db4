"""Probe sampling and the argument checks shared by the estimators."""

from __future__ import annotations

import logging
import secrets
from typing import Optional

import torch

from hutch.linop import quadratic_forms

logger = logging.getLogger("hutch")

DISTRIBUTIONS = ("rademacher", "gaussian")

# Probes per matmat call when neither the caller nor the operator sets a size.
DEFAULT_PROBE_BLOCK = 32


def resolve_generator(
    generator: Optional[torch.Generator], seed: Optional[int], A
) -> tuple[torch.Generator, Optional[int]]:
    """Return the generator to draw probes from for one estimate on ``A``, and the seed it started from.

    A caller passes either a generator or a seed. With neither, a seed is
    drawn from the operating system's entropy pool (never from torch's global
    generator), logged, and returned so the result records it and the call
    can be repeated exactly. A new generator lives on ``A.device``.

    Every estimator calls this once before its first product, so it also
    calls the operator's ``begin_estimate`` hook: a
    :class:`hutch.HessianOperator` fixes the randomness of its forward pass
    (dropout) for the estimate from the generator's state there.
    """
    generator, seed = _generator_and_seed(generator, seed, A.device)
    begin_estimate(A, generator)
    return generator, seed


def _generator_and_seed(
    generator: Optional[torch.Generator], seed: Optional[int], device: torch.device
) -> tuple[torch.Generator, Optional[int]]:
    if generator is not None and seed is not None:
        raise ValueError(
            f"pass either generator or seed, not both; got generator={generator!r} and "
            f"seed={seed!r}"
        )
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator; got {type(generator).__name__}. "
                "Pass seed=<int> to seed a new one instead"
            )
        return generator, None

    if seed is None:
        seed = secrets.randbits(63)
        logger.info("no generator or seed given; drawing probes from seed %d", seed)
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")

    new_generator = torch.Generator(device=device)
    new_generator.manual_seed(seed)
    return new_generator, seed


def sample_probes(
    num_rows: int,
    num_probes: int,
    distribution: str,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Draw ``num_probes`` probe vectors with E[z z^T] = I as columns of a (num_rows, num_probes) tensor.

    Each probe is drawn whole, one after the other, directly in ``dtype``.
    So a generator gives the same sequence of probes however an estimator
    splits them into blocks, and a block costs no more memory than its
    result. Probes are drawn on the generator's device and moved to
    ``device``, so a seed gives the same probes whatever the operator's
    device, as long as the generator's device is the same.

    Returns:
        A ``(num_rows, num_probes)`` tensor, the transpose of a contiguous
        ``(num_probes, num_rows)`` one.
    """
    check_distribution(distribution)
    probes = torch.empty(num_probes, num_rows, dtype=dtype, device=generator.device)
    for row in probes:
        if distribution == "rademacher":
            torch.randint(0, 2, (num_rows,), generator=generator, dtype=dtype, device=generator.device, out=row)
            row.mul_(2).sub_(1)
        else:
            torch.randn(num_rows, generator=generator, dtype=dtype, device=generator.device, out=row)
    return probes.to(device).T


def probe_block_size(A, batch_size: Optional[int]) -> int:
    """Return how many probes an estimator passes to one ``matmat`` call.

    An explicit ``batch_size`` wins. Otherwise the default is
    ``DEFAULT_PROBE_BLOCK``, capped by the operator's own chunk size when it
    has one (a :class:`hutch.HessianOperator` sizes its chunks to its memory
    budget), so probes for a large model do not outgrow that budget.
    """
    if batch_size is not None:
        return batch_size
    operator_chunk = getattr(A, "batch_size", None)
    if isinstance(operator_chunk, int) and not isinstance(operator_chunk, bool) and operator_chunk >= 1:
        return min(DEFAULT_PROBE_BLOCK, operator_chunk)
    return DEFAULT_PROBE_BLOCK


def check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {list(DISTRIBUTIONS)}; got {distribution!r}"
        )


def check_num_matvecs(num_matvecs: int, minimum: int, method: str) -> None:
    """Raise unless ``num_matvecs`` is an int of at least ``minimum``."""
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int):
        raise TypeError(f"num_matvecs must be an int; got {type(num_matvecs).__name__} {num_matvecs!r}")
    if num_matvecs < minimum:
        raise ValueError(
            f"num_matvecs={num_matvecs} is too small for {method}, which needs at least "
            f"{minimum} matrix-vector products; raise num_matvecs"
        )


def check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size must be None or a positive int; got {batch_size!r}"
        )


def chunked_matmat(A, V: torch.Tensor, batch_size: Optional[int]) -> torch.Tensor:
    """Return ``A.matmat(V)``, passing at most ``batch_size`` columns per call."""
    if batch_size is None or V.shape[1] <= batch_size:
        return A.matmat(V)
    return torch.cat(
        [A.matmat(V[:, i : i + batch_size]) for i in range(0, V.shape[1], batch_size)], dim=1
    )


def chunked_quadratic_forms(A, V: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Return ``v_i^T A v_i`` for the columns of ``V``, passing at most ``batch_size`` columns per call."""
    if V.shape[1] == 0:
        return torch.zeros(0, dtype=V.dtype, device=V.device)
    return torch.cat([quadratic_forms(A, V[:, i : i + batch_size]) for i in range(0, V.shape[1], batch_size)])


def begin_estimate(A, generator: torch.Generator) -> None:
    """Call ``A.begin_estimate(generator)`` if the operator has that hook.

    A :class:`hutch.HessianOperator` uses it to seed the randomness of its
    forward pass (dropout) for the whole estimate from the generator's
    state, without drawing from the generator.
    """
    hook = getattr(A, "begin_estimate", None)
    if callable(hook):
        hook(generator)


def operator_info(A) -> dict:
    """Return what an estimate records about its operator: the HVP path of a Hessian operator."""
    path = getattr(A, "hvp_path", None)
    return {} if path is None else {"hvp_path": path}
