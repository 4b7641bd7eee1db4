"""Symmetric test matrices with prescribed eigenvalues, so every trace is known exactly."""

from __future__ import annotations

import torch


def random_orthogonal(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Return a Haar-distributed n x n orthogonal matrix."""
    G = torch.randn(n, n, generator=generator, dtype=dtype)
    Q, R = torch.linalg.qr(G)
    # Fixing the signs of R's diagonal makes Q uniformly distributed.
    return Q * torch.sign(torch.diagonal(R))


def matrix_with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Return U diag(eigenvalues) U^T with U random orthogonal, in float64."""
    eigenvalues = eigenvalues.to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    U = random_orthogonal(eigenvalues.numel(), generator)
    return (U * eigenvalues) @ U.T


def spectrum(kind: str, n: int) -> torch.Tensor:
    """Named eigenvalue profiles used across the estimator tests.

    - ``"fast"``: i^-2, a fast-decaying PSD spectrum.
    - ``"slow"``: i^-0.5, a slowly decaying PSD spectrum.
    - ``"exp"``: exp(-i / 5), exponential decay.
    - ``"flat"``: all ones, the identity's spectrum.
    - ``"indefinite"``: alternating signs with slow decay, negative trace.
    - ``"lowrank"``: 5 nonzero eigenvalues, the rest zero.
    """
    i = torch.arange(1, n + 1, dtype=torch.float64)
    if kind == "fast":
        return i**-2.0
    if kind == "slow":
        return i**-0.5
    if kind == "exp":
        return torch.exp(-i / 5.0)
    if kind == "flat":
        return torch.ones(n, dtype=torch.float64)
    if kind == "indefinite":
        signs = torch.where(i % 2 == 0, 1.0, -1.0).to(torch.float64)
        return signs * i**-0.3 - 0.05
    if kind == "lowrank":
        values = torch.zeros(n, dtype=torch.float64)
        values[:5] = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
        return values
    raise ValueError(f"unknown spectrum kind {kind!r}")
