"""XTrace and XNysTrace: exchangeable trace estimators with a leave-one-out error estimate.

Both estimators come from E. N. Epperly, J. A. Tropp and R. J. Webber,
"XTrace: making the most of every sample in stochastic trace estimation",
SIAM Journal on Matrix Analysis and Applications, 2024. Each test vector
serves twice: as part of the low-rank sketch that deflates the trace, and,
with the sketch rebuilt without it, as the Hutchinson probe of what the
sketch missed. Averaging the k leave-one-out estimates uses every product
for both purposes, and their spread gives the error estimate.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from hutch._sampling import (
    probe_block_size,
    chunked_matmat,
    operator_info,
    sample_probes,
)
from hutch.exact import begin_trace_estimate
from hutch.hutchinson import _std_error
from hutch.linop import OperatorLike
from hutch.result import TraceEstimate

# XTrace needs two test vectors (four products) for a leave-one-out spread.
XTRACE_MIN_MATVECS = 4

# XNysTrace needs two test vectors (two products) for a leave-one-out spread.
XNYSTRACE_MIN_MATVECS = 2

# Shift growth and attempts when the Cholesky factorization of the Nystrom core fails.
_SHIFT_GROWTH = 100.0
_SHIFT_ATTEMPTS = 6


def sample_test_vectors(
    n: int,
    k: int,
    distribution: str,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Draw k test vectors as columns of an (n, k) tensor with E[ω ω^T] = I.

    ``"gaussian"`` vectors are normalized to the sphere of radius sqrt(n),
    as the improved estimators of Epperly, Tropp and Webber require; they
    stay isotropic, so E[ω ω^T] = I still holds.
    """
    if distribution == "gaussian":
        Omega = sample_probes(n, k, "gaussian", generator, dtype, device)
        return Omega * (math.sqrt(n) / torch.linalg.vector_norm(Omega, dim=0))
    return sample_probes(n, k, distribution, generator, dtype, device)


def leave_one_out_directions(R: torch.Tensor) -> torch.Tensor:
    """Return S whose column i is the unit vector orthogonal to every column of R but column i.

    For ``Y = Q R`` with R square upper triangular, the range of Y without
    column i is the range of ``Q (I - s_i s_i^T)``, so removing one column
    of Y from the sketch removes the single direction ``Q s_i`` from Q.
    Column i of S is row i of ``R^{-1}``, normalized: the rows of
    ``R^{-1}`` satisfy ``(R^{-1})_{i,:} R_{:,j} = 0`` for ``j != i``. Rows
    are computed as rows of ``diag(R) R^{-1}``, whose diagonal is 1, so
    nothing overflows when R is nearly singular.
    """
    diagonal = torch.diagonal(R).clone()
    # A zero pivot means Y lost rank. A tiny pivot in its place keeps the solve
    # finite, and the row stays orthogonal to the other columns up to rounding.
    floor = torch.finfo(R.dtype).eps * diagonal.abs().max().clamp_min(torch.finfo(R.dtype).tiny)
    diagonal = torch.where(diagonal.abs() < floor, floor, diagonal)
    R = R - torch.diag(torch.diagonal(R)) + torch.diag(diagonal)

    # X R = diag(R)  <=>  X = diag(R) R^{-1}.
    X = torch.linalg.solve_triangular(R, torch.diag(diagonal), upper=True, left=False)
    return (X / torch.linalg.vector_norm(X, dim=1, keepdim=True)).T


def xtrace(
    A: OperatorLike,
    num_matvecs: int,
    *,
    distribution: str = "gaussian",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> TraceEstimate:
    r"""Estimate ``tr(A)`` with XTrace.

    With k = ⌊``num_matvecs`` / 2⌋ test vectors :math:`\Omega = [\omega_1,
    \dots, \omega_k]`, let :math:`Q_{(i)}` be an orthonormal basis of
    :math:`A \Omega_{-i}`, the sketch without :math:`\omega_i`. XTrace
    averages the k Hutch++-style estimates

    .. math::
        t_i = \mathrm{tr}(Q_{(i)}^\top A Q_{(i)})
            + \omega_i^\top (I - Q_{(i)} Q_{(i)}^\top) A (I - Q_{(i)} Q_{(i)}^\top) \omega_i ,
        \qquad \widehat{\mathrm{tr}}(A) = \frac{1}{k} \sum_{i=1}^k t_i .

    Each :math:`t_i` is unbiased because :math:`\omega_i` is independent of
    :math:`Q_{(i)}`. All k bases come from one QR factorization
    :math:`A\Omega = QR`: :math:`Q_{(i)} Q_{(i)}^\top = Q (I - s_i s_i^\top) Q^\top`
    with :math:`s_i` the normalized i-th row of :math:`R^{-1}`, so the cost
    is k products for :math:`A\Omega` and k for :math:`AQ`, and no more.
    An odd ``num_matvecs`` buys one more term of the same form with a fresh
    vector :math:`\omega_{k+1}` that is not in the sketch, so
    :math:`Q_{(k+1)} = Q`; it is unbiased too and costs one product.

    ``std_error`` is the leave-one-out estimate of the paper: the sample
    standard deviation of the :math:`t_i` over the square root of their
    number. The :math:`t_i` share test vectors and are not independent, so
    this is a heuristic and the confidence interval built from it is
    approximate.

    With ``distribution="gaussian"`` (the default), this is the paper's
    improved estimator: test vectors are uniform on the sphere of radius
    :math:`\sqrt{n}`, and each residual probe
    :math:`(I - Q_{(i)}Q_{(i)}^\top)\omega_i` is rescaled to the norm
    :math:`\sqrt{d}`, d the dimension of the space it is uniform in
    (n - k + 1, or n - k for the extra term). By rotation invariance this
    keeps each :math:`t_i` unbiased and lowers its variance. Rademacher
    vectors are used as drawn.

    The estimator does not assume symmetry. When ``num_matvecs`` is at
    least the dimension n, the trace is computed exactly from n unit-vector
    products instead, with standard error 0.

    Reference: E. N. Epperly, J. A. Tropp and R. J. Webber, "XTrace: making
    the most of every sample in stochastic trace estimation", SIAM Journal
    on Matrix Analysis and Applications, 2024.

    Args:
        A: A square tensor, or an operator with ``shape``, ``dtype``,
            ``device`` and ``matmat``, such as :class:`hutch.HessianOperator`.
        num_matvecs: Matrix-vector products to spend, at least 4 (two test
            vectors) unless it covers n.
        distribution: ``"gaussian"`` (default, normalized as above) or
            ``"rademacher"``.
        generator: Source of the test vectors. Mutually exclusive with
            ``seed``.
        seed: Seed for a new generator on ``A.device``. With neither
            ``generator`` nor ``seed``, a seed is drawn from the operating
            system and recorded in the result.
        batch_size: Vectors per ``matmat`` call; default 32, or the
            operator's own chunk size when that is smaller.

    Returns:
        A :class:`hutch.TraceEstimate` with ``num_samples`` the number of
        terms :math:`t_i` and ``info`` holding ``distribution`` and
        ``sketch_size`` (k).

    Raises:
        ValueError: If ``num_matvecs`` < 4 and below n, or ``distribution``
            or ``batch_size`` is invalid.

    Example:
        >>> import torch, hutch
        >>> A = torch.diag(torch.tensor([10.0, 5.0, 1.0] + [0.0] * 97, dtype=torch.float64))
        >>> round(hutch.xtrace(A, 10, seed=0).value, 8)  # rank 3 < k - 1 = 4
        16.0
    """
    A, generator, seed, exact = begin_trace_estimate(
        A, num_matvecs, "xtrace", XTRACE_MIN_MATVECS, distribution, generator, seed, batch_size
    )
    if exact is not None:
        return exact
    n = A.shape[0]

    step = probe_block_size(A, batch_size)
    k = num_matvecs // 2
    improved = distribution == "gaussian"

    # Sketch: Y = A Ω = Q R.
    Omega = sample_test_vectors(n, k, distribution, generator, A.dtype, A.device)
    Y = chunked_matmat(A, Omega, step)
    Q, R = torch.linalg.qr(Y)
    S = leave_one_out_directions(R)
    W = Q.T @ Omega
    c = (S * W).sum(dim=0)

    # Improved estimator: rescale ω_i so its residual (I - Q_(i) Q_(i)^T) ω_i
    # has norm sqrt(n - k + 1). Scaling columns of Ω scales the same columns
    # of Y, R, W and c and leaves Q and S unchanged.
    if improved:
        residual_sq = (Omega * Omega).sum(dim=0) - (W * W).sum(dim=0) + c**2
        scale = torch.sqrt((n - k + 1) / residual_sq.clamp_min(torch.finfo(A.dtype).tiny))
        Omega, Y, R, W, c = Omega * scale, Y * scale, R * scale, W * scale, c * scale

    # Second pass: Z = A Q, H = Q^T A Q, T = Z^T Ω.
    Z = chunked_matmat(A, Q, step)
    H = Q.T @ Z
    T = Z.T @ Omega
    HS, HW = H @ S, H @ W

    # With x_i = (I - Q_(i) Q_(i)^T) ω_i = ω_i - Q w_i + c_i Q s_i, expanding
    # x_i^T A x_i with A ω_i = y_i, Q^T y_i = r_i, A Q = Z and Z^T ω_i = t_i
    # gives the residual term below. The first two terms cancel when Y = QR
    # is exact, and absorb its rounding error otherwise.
    residual = (
        (Omega * Y).sum(dim=0)
        - (W * R).sum(dim=0)
        - (T * W).sum(dim=0)
        + (W * HW).sum(dim=0)
        + c * ((T * S).sum(dim=0) - (W * HS).sum(dim=0))
        + c * ((S * R).sum(dim=0) - (S * HW).sum(dim=0))
        + c**2 * (S * HS).sum(dim=0)
    )

    # tr(Q_(i)^T A Q_(i)) = tr(H) - s_i^T H s_i.
    estimates = torch.trace(H) - (S * HS).sum(dim=0) + residual

    # An odd budget: one more term with the full sketch and a fresh vector.
    if num_matvecs % 2 == 1:
        extra = _full_sketch_term(A, Q, H, improved, distribution, generator)
        estimates = torch.cat([estimates, extra.reshape(1)])
    estimates = estimates.double()

    return TraceEstimate(
        value=float(estimates.mean()),
        std_error=_std_error(estimates),
        num_matvecs=num_matvecs,
        method="xtrace",
        num_samples=estimates.numel(),
        seed=seed,
        info={"distribution": distribution, "sketch_size": k, **operator_info(A)},
    )


def _full_sketch_term(A, Q, H, improved: bool, distribution: str, generator) -> torch.Tensor:
    """Return tr(Q^T A Q) + x^T A x with x = (I - Q Q^T) ω for a fresh ω, using one product."""
    n, k = Q.shape
    omega = sample_test_vectors(n, 1, distribution, generator, A.dtype, A.device)
    x = omega - Q @ (Q.T @ omega)
    if improved:
        x = x * (math.sqrt(n - k) / torch.linalg.vector_norm(x).clamp_min(torch.finfo(A.dtype).tiny))
    return torch.trace(H) + (x * A.matmat(x)).sum()


def xnystrace(
    A: OperatorLike,
    num_matvecs: int,
    *,
    distribution: str = "gaussian",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> TraceEstimate:
    r"""Estimate ``tr(A)`` of a positive semi-definite ``A`` with XNysTrace.

    Calling this function declares A symmetric positive semi-definite (PSD);
    for an indefinite A, such as most neural-network Hessians, use
    :func:`hutch.xtrace`. With k = ``num_matvecs`` test vectors and the
    Nyström approximation built without :math:`\omega_i`,

    .. math::
        \hat A_{(i)} = A\Omega_{-i} (\Omega_{-i}^\top A \Omega_{-i})^{+} (A\Omega_{-i})^\top ,
        \qquad t_i = \mathrm{tr}(\hat A_{(i)}) + \omega_i^\top (A - \hat A_{(i)}) \omega_i ,

    the estimate is the mean of the :math:`t_i`. Every product serves the
    sketch, so XNysTrace spends half as many products as XTrace for a sketch
    of the same size. All k Nyström approximations come from one Cholesky
    factorization :math:`\Omega^\top A \Omega = C^\top C`: with
    :math:`B = A\Omega C^{-1}` and :math:`x_i = C^{-\top} e_i`,
    :math:`\mathrm{tr}(\hat A_{(i)}) = \|B\|_F^2 - \|B x_i\|^2 / \|x_i\|^2`
    and :math:`\omega_i^\top (A - \hat A_{(i)}) \omega_i = 1 / \|x_i\|^2`.
    For stability the products are taken with :math:`A + \nu I`, with
    :math:`\nu` the unit roundoff times :math:`\|A\Omega\|_F / \sqrt{n}`,
    and :math:`\nu n` is subtracted.

    ``std_error`` is the leave-one-out estimate: the sample standard
    deviation of the :math:`t_i` over :math:`\sqrt{k}`, a heuristic because
    the :math:`t_i` are not independent. With ``distribution="gaussian"``
    (the default, the paper's improved estimator), test vectors are
    uniform on the sphere of radius :math:`\sqrt{n}` and the residual
    probe, the part of :math:`\omega_i` outside the span of the other test
    vectors, is rescaled to norm :math:`\sqrt{n - k + 1}`. Rademacher
    vectors are used as drawn.

    When ``num_matvecs`` is at least n, the trace is computed exactly from
    n unit-vector products instead, with standard error 0.

    Reference: E. N. Epperly, J. A. Tropp and R. J. Webber, "XTrace: making
    the most of every sample in stochastic trace estimation", SIAM Journal
    on Matrix Analysis and Applications, 2024.

    Args:
        A: A symmetric positive semi-definite square tensor or operator.
        num_matvecs: Matrix-vector products to spend, at least 2 unless it
            covers n.
        distribution: ``"gaussian"`` (default, normalized as above) or
            ``"rademacher"``.
        generator: Source of the test vectors. Mutually exclusive with
            ``seed``.
        seed: Seed for a new generator on ``A.device``. With neither
            ``generator`` nor ``seed``, a seed is drawn from the operating
            system and recorded in the result.
        batch_size: Vectors per ``matmat`` call; default 32, or the
            operator's own chunk size when that is smaller.

    Returns:
        A :class:`hutch.TraceEstimate` with ``num_samples`` = k and ``info``
        holding ``distribution``, ``sketch_size`` (k) and ``shift`` (ν).

    Raises:
        ValueError: If ``num_matvecs`` < 2 and below n, ``distribution`` or
            ``batch_size`` is invalid, or A is evidently not PSD (a negative
            :math:`\omega_i^\top A \omega_i`, or a core matrix that stays
            indefinite after shifting).

    Example:
        >>> import torch, hutch
        >>> A = torch.diag(torch.tensor([10.0, 5.0, 1.0] + [0.0] * 97, dtype=torch.float64))
        >>> round(hutch.xnystrace(A, 5, seed=0).value, 6)  # rank 3 < k - 1 = 4
        16.0
    """
    A, generator, seed, exact = begin_trace_estimate(
        A, num_matvecs, "xnystrace", XNYSTRACE_MIN_MATVECS, distribution, generator, seed, batch_size
    )
    if exact is not None:
        return exact
    n = A.shape[0]

    k = num_matvecs

    # Sketch: Y = A Ω, then the shifted sketch Y_ν = (A + ν I) Ω.
    Omega = sample_test_vectors(n, k, distribution, generator, A.dtype, A.device)
    Y = chunked_matmat(A, Omega, probe_block_size(A, batch_size))
    _check_psd_quadratic_forms(Omega, Y)
    nu, C, Y_nu = _shifted_cholesky(Omega, Y)

    # B = Y_ν C^{-1} through the QR factors of Y_ν; the Nyström approximation
    # of A + ν I is Q B B^T Q^T, so only the small factor R C^{-1} matters.
    R = torch.linalg.qr(Y_nu, mode="r")[1]
    B = torch.linalg.solve_triangular(C, R, upper=True, left=False)

    # Leave-one-out terms: ||x_i||^2 = (G^{-1})_{ii} with x_i = C^{-T} e_i.
    C_inv = torch.linalg.solve_triangular(
        C, torch.eye(k, dtype=C.dtype, device=C.device), upper=True
    )
    x_norm_sq = (C_inv * C_inv).sum(dim=1)
    BX = B @ C_inv.T
    removed = (BX * BX).sum(dim=0) / x_norm_sq
    residual = 1.0 / x_norm_sq

    # Improved estimator: rescale the residual probe to norm sqrt(n - k + 1).
    if distribution == "gaussian":
        residual = residual * _nystrom_residual_scale(Omega)

    estimates = ((B * B).sum() - removed + residual - nu * n).double()

    return TraceEstimate(
        value=float(estimates.mean()),
        std_error=_std_error(estimates),
        num_matvecs=k,
        method="xnystrace",
        num_samples=k,
        seed=seed,
        info={"distribution": distribution, "sketch_size": k, "shift": nu, **operator_info(A)},
    )


def _check_psd_quadratic_forms(Omega: torch.Tensor, Y: torch.Tensor) -> None:
    """Raise if some ω_i^T A ω_i is clearly negative, which no PSD matrix allows."""
    forms = (Omega * Y).sum(dim=0)
    scale = torch.linalg.vector_norm(Omega, dim=0) * torch.linalg.vector_norm(Y, dim=0)
    tolerance = 100 * torch.finfo(Y.dtype).eps * scale
    negative = forms < -tolerance
    if bool(negative.any()):
        worst = float(forms.min())
        raise ValueError(
            f"A is not positive semi-definite: a test vector gave omega^T A omega = {worst:.6g} "
            "< 0. xnystrace requires a PSD operator; use hutch.xtrace for indefinite ones "
            "such as most neural-network Hessians"
        )


def _shifted_cholesky(Omega: torch.Tensor, Y: torch.Tensor):
    """Return ν, the upper Cholesky factor C of Ω^T (A + ν I) Ω, and (A + ν I) Ω."""
    n = Omega.shape[0]
    eps = torch.finfo(Y.dtype).eps
    nu = eps * float(torch.linalg.matrix_norm(Y)) / math.sqrt(n)
    if nu == 0.0:
        nu = eps

    for _ in range(_SHIFT_ATTEMPTS):
        Y_nu = Y + nu * Omega
        G = Omega.T @ Y_nu
        G = (G + G.T) / 2
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) == 0:
            return nu, L.T, Y_nu
        nu *= _SHIFT_GROWTH

    raise ValueError(
        "A is not positive semi-definite: Omega^T A Omega stayed indefinite after shifting "
        f"A by up to {nu / _SHIFT_GROWTH:.3g} I. xnystrace requires a PSD operator; use "
        "hutch.xtrace for indefinite ones such as most neural-network Hessians"
    )


def _nystrom_residual_scale(Omega: torch.Tensor) -> torch.Tensor:
    """Return (n - k + 1) / ||(I - P_(i)) ω_i||^2, P_(i) the projector onto span(Ω_{-i}).

    A - Â_(i) vanishes on span(Ω_{-i}), so only the part of ω_i outside it
    enters the residual term; this factor rescales that part to squared
    norm n - k + 1, the dimension of the space it is uniform in.
    """
    n, k = Omega.shape
    Q, R = torch.linalg.qr(Omega)
    S = leave_one_out_directions(R)
    W = Q.T @ Omega
    c = (S * W).sum(dim=0)
    outside_sq = (Omega * Omega).sum(dim=0) - (W * W).sum(dim=0) + c**2
    return (n - k + 1) / outside_sq.clamp_min(torch.finfo(Omega.dtype).tiny)
