"""Diagonal estimation: Hutchinson's diagonal estimator, Diag++ and XDiag.

Every method here writes its estimate as an exact part plus the mean of
per-sample diagonal vectors, ``d = exact_part + mean_i(d_i)``, and the
per-entry standard error is the sample standard deviation of the ``d_i``
over the square root of their number. :func:`hutch.block_traces` reduces
the same per-sample vectors to per-block sums, so block traces and
diagonals share one implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from hutch._sampling import (
    probe_block_size,
    check_batch_size,
    check_distribution,
    check_num_matvecs,
    chunked_matmat,
    operator_info,
    resolve_generator,
    sample_probes,
)
from hutch.exact import exact_diagonal
from hutch.layout import ParameterLayout
from hutch.linop import DenseOperator, OperatorLike, as_linear_operator
from hutch.xtrace import leave_one_out_directions

# Minimum num_matvecs of each method when the budget is below the dimension.
MIN_MATVECS = {"hutchinson": 1, "hutchpp": 4, "xdiag": 4}

DIAGONAL_METHODS = tuple(MIN_MATVECS)


@dataclass(frozen=True, eq=False)
class DiagonalEstimate:
    """An estimate of the diagonal of a square operator, with per-entry standard errors.

    Attributes:
        values: The estimated diagonal, shape ``(n,)``, in the operator's
            dtype and device.
        std_error: Estimated standard error of each entry, shape ``(n,)``;
            zeros when the values are exact, ``nan`` with fewer than two
            samples.
        num_matvecs: Matrix-vector products spent, counting one per column
            of every block passed to ``matmat``.
        method: ``"hutchinson"``, ``"hutchpp"`` or ``"xdiag"``.
        num_samples: Number of per-sample diagonal vectors behind
            ``std_error``.
        exact: Whether ``values`` is the exact diagonal (the budget covered
            the dimension), up to floating-point rounding.
        seed: The seed the probes were drawn from, or ``None`` when the
            caller passed a ``torch.Generator``.
        layout: The operator's :class:`hutch.ParameterLayout` when it has
            one, used by :meth:`per_parameter`.
        info: Method-specific details, such as the sketch size.
    """

    values: torch.Tensor
    std_error: torch.Tensor
    num_matvecs: int
    method: str
    num_samples: int
    exact: bool = False
    seed: Optional[int] = None
    layout: Optional[ParameterLayout] = None
    info: dict[str, Any] = field(default_factory=dict)

    def per_parameter(self) -> dict[str, torch.Tensor]:
        """Return the diagonal split into tensors shaped like the parameters.

        Raises:
            ValueError: If the operator had no parameter layout.
        """
        return self._split(self.values)

    def std_error_per_parameter(self) -> dict[str, torch.Tensor]:
        """Return the per-entry standard errors split into tensors shaped like the parameters.

        Raises:
            ValueError: If the operator had no parameter layout.
        """
        return self._split(self.std_error)

    def trace(self) -> float:
        """Return the sum of the estimated diagonal, an estimate of the trace."""
        return float(self.values.sum())

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.layout is None:
            raise ValueError(
                "this diagonal estimate has no parameter layout because the operator had "
                "none (a plain tensor or a custom operator); index the flat tensor "
                "`values` directly, or estimate on a hutch.HessianOperator"
            )
        return self.layout.split(flat)

    def __repr__(self) -> str:
        return (
            f"DiagonalEstimate(n={self.values.numel()}, method={self.method!r}, "
            f"num_matvecs={self.num_matvecs}, num_samples={self.num_samples}, "
            f"exact={self.exact})"
        )


@dataclass
class DiagonalSamples:
    """A diagonal estimate written as ``exact_part + mean of the sample vectors``.

    Attributes:
        exact_part: Shape ``(n,)``; zeros for methods without one.
        batches: Yields blocks of per-sample diagonal vectors, each of shape
            ``(n, b)``. Products are computed as the blocks are drawn.
        num_matvecs: Products spent once ``batches`` is exhausted.
        num_samples: Total number of sample vectors across the blocks.
        info: Method-specific details.
    """

    exact_part: torch.Tensor
    batches: Iterator[torch.Tensor]
    num_matvecs: int
    num_samples: int
    info: dict[str, Any]


def diagonal(
    A: OperatorLike,
    num_matvecs: int,
    *,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> DiagonalEstimate:
    r"""Estimate the diagonal of ``A`` from matrix-vector products.

    Three methods, all unbiased:

    - ``"hutchinson"`` (Bekas, Kokiopoulou and Saad 2007): with m probes
      :math:`z_i`, :math:`\hat d = \frac{1}{m} \sum_i z_i \odot A z_i`.
      With Rademacher probes this equals the paper's normalized form,
      because :math:`z_i \odot z_i = 1`. Entry j has variance
      :math:`\sum_{l \ne j} A_{jl}^2 / m` for Rademacher probes.
    - ``"hutchpp"`` (Diag++, Baston and Nakatsukasa 2022): a third of the
      budget sketches :math:`Q = \mathrm{orth}(AS)`, a third computes
      :math:`A^\top Q`, and the rest runs Hutchinson on the remainder, from
      :math:`\mathrm{diag}(A) = \mathrm{diag}(QQ^\top A) + \mathrm{diag}((I - QQ^\top) A)`.
      That identity is true entry by entry, so every entry, and every sum of
      entries, is deflated correctly.
    - ``"xdiag"`` (Epperly, Tropp and Webber 2024): the exchangeable
      version of Diag++. With k = ⌊m / 2⌋ test vectors and
      :math:`Q_{(i)}` an orthonormal basis of :math:`A\Omega_{-i}`, it
      averages
      :math:`d_i = \mathrm{diag}(Q_{(i)} Q_{(i)}^\top A) + \omega_i \odot (I - Q_{(i)} Q_{(i)}^\top) A \omega_i`.
      Its ``std_error`` is the leave-one-out spread of the :math:`d_i`, a
      heuristic because they share test vectors. An odd budget adds one
      :math:`d_{k+1}` with a fresh vector and the full sketch.

    ``"hutchpp"`` and ``"xdiag"`` need products with :math:`A^\top`. For a
    tensor, :math:`A^\top` is used; any other operator is taken to be
    symmetric, as a Hessian is, and ``matmat`` stands in for the adjoint.

    When ``num_matvecs`` is at least n, the diagonal is computed exactly
    from n unit-vector products instead, with standard errors 0.

    References:
        C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the diagonal
        of a matrix", Applied Numerical Mathematics, 2007.
        R. A. Baston and Y. Nakatsukasa, "Stochastic diagonal estimation:
        probabilistic bounds and an improved algorithm", arXiv:2201.10684,
        2022.
        E. N. Epperly, J. A. Tropp and R. J. Webber, "XTrace: making the
        most of every sample in stochastic trace estimation", SIAM Journal
        on Matrix Analysis and Applications, 2024.

    Args:
        A: A square tensor, or an operator with ``shape``, ``dtype``,
            ``device`` and ``matmat``, such as :class:`hutch.HessianOperator`.
        num_matvecs: Matrix-vector products to spend: at least 1 for
            ``"hutchinson"`` and 4 for the others, unless it covers n.
        method: ``"hutchinson"`` (default), ``"hutchpp"`` or ``"xdiag"``.
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        generator: Source of the probes. Mutually exclusive with ``seed``.
        seed: Seed for a new generator on ``A.device``. With neither
            ``generator`` nor ``seed``, a seed is drawn from the operating
            system and recorded in the result.
        batch_size: Vectors per ``matmat`` call; default 32, or the
            operator's own chunk size when that is smaller.

    Returns:
        A :class:`hutch.DiagonalEstimate`. Its :meth:`~DiagonalEstimate.per_parameter`
        gives tensors shaped like the parameters when ``A`` has a
        ``layout``, as a :class:`hutch.HessianOperator` does.

    Raises:
        ValueError: If ``method``, ``distribution``, ``batch_size`` or
            ``num_matvecs`` is invalid.

    Example:
        >>> import torch, hutch
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> est = hutch.diagonal(A, 10, seed=0)
        >>> est.values[:3].tolist()  # diagonal A: Rademacher terms are exact
        [1.0, 2.0, 3.0]
    """
    A, samples, seed = diagonal_samples(A, num_matvecs, method, distribution, generator, seed, batch_size)
    layout = getattr(A, "layout", None)
    if samples is None:
        values = exact_diagonal(A, batch_size=batch_size)
        return DiagonalEstimate(
            values=values,
            std_error=torch.zeros_like(values),
            num_matvecs=A.shape[0],
            method=method,
            num_samples=A.shape[0],
            exact=True,
            layout=layout if isinstance(layout, ParameterLayout) else None,
        )

    mean, m2, count = _running_moments(samples.batches)
    std_error = _std_error_from_moments(m2, count)
    return DiagonalEstimate(
        values=(samples.exact_part + mean.to(samples.exact_part.dtype)),
        std_error=std_error.to(samples.exact_part.dtype),
        num_matvecs=samples.num_matvecs,
        method=method,
        num_samples=count,
        seed=seed,
        layout=layout if isinstance(layout, ParameterLayout) else None,
        info={**samples.info, **operator_info(A)},
    )


def diagonal_samples(
    A: OperatorLike,
    num_matvecs: int,
    method: str,
    distribution: str,
    generator: Optional[torch.Generator],
    seed: Optional[int],
    batch_size: Optional[int],
):
    """Check the arguments and return ``(operator, DiagonalSamples or None, seed)``.

    ``None`` in place of the samples means the budget covers n and the
    caller should take the exact path.
    """
    operator = as_linear_operator(A)
    if method not in DIAGONAL_METHODS:
        raise ValueError(f"method must be one of {list(DIAGONAL_METHODS)}; got {method!r}")
    check_distribution(distribution)
    check_batch_size(batch_size)
    generator, seed = resolve_generator(generator, seed, operator)
    n = operator.shape[0]
    if isinstance(num_matvecs, int) and not isinstance(num_matvecs, bool) and num_matvecs >= n:
        return operator, None, seed
    check_num_matvecs(num_matvecs, MIN_MATVECS[method], method)

    step = probe_block_size(operator, batch_size)
    build = {"hutchinson": _hutchinson_samples, "hutchpp": _diagpp_samples, "xdiag": _xdiag_samples}
    samples = build[method](operator, num_matvecs, distribution, generator, step)
    samples.info.setdefault("distribution", distribution)
    return operator, samples, seed


def _adjoint_matmat(A, V: torch.Tensor, step: int) -> torch.Tensor:
    """Return ``A^T V``: exact for a dense matrix, ``A V`` for any other operator (taken symmetric)."""
    if isinstance(A, DenseOperator):
        return A.matrix.mT @ V
    return chunked_matmat(A, V, step)


def _hutchinson_samples(A, num_matvecs: int, distribution: str, generator, step: int) -> DiagonalSamples:
    n = A.shape[0]

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, num_matvecs, step):
            Z = sample_probes(n, min(step, num_matvecs - start), distribution, generator, A.dtype, A.device)
            yield Z * A.matmat(Z)

    exact_part = torch.zeros(n, dtype=A.dtype, device=A.device)
    return DiagonalSamples(exact_part, batches(), num_matvecs, num_matvecs, {})


def _diagpp_samples(A, num_matvecs: int, distribution: str, generator, step: int) -> DiagonalSamples:
    n = A.shape[0]
    k = num_matvecs // 3
    r = num_matvecs - 2 * k

    # Sketch Q = orth(A S), then Z = A^T Q, so Q^T A = Z^T.
    S = sample_probes(n, k, distribution, generator, A.dtype, A.device)
    Q, _ = torch.linalg.qr(chunked_matmat(A, S, step))
    del S
    Z = _adjoint_matmat(A, Q, step)

    # Exact part: diag(Q Q^T A) = rowwise sums of Q ⊙ Z.
    exact_part = (Q * Z).sum(dim=1)

    # Remainder: g ⊙ (I - Q Q^T) A g = g ⊙ (A g - Q (Z^T g)).
    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, r, step):
            G = sample_probes(n, min(step, r - start), distribution, generator, A.dtype, A.device)
            yield G * (A.matmat(G) - Q @ (Z.T @ G))

    info = {"sketch_size": k, "residual_probes": r}
    return DiagonalSamples(exact_part, batches(), num_matvecs, r, info)


def _xdiag_samples(A, num_matvecs: int, distribution: str, generator, step: int) -> DiagonalSamples:
    n = A.shape[0]
    k = num_matvecs // 2

    # Sketch Y = A Ω = Q R and the leave-one-out directions s_i.
    Omega = sample_probes(n, k, distribution, generator, A.dtype, A.device)
    Y = chunked_matmat(A, Omega, step)
    Q, R = torch.linalg.qr(Y)
    S = leave_one_out_directions(R)

    # Z = A^T Q, so Q^T A = Z^T, and T = Z^T Ω.
    Z = _adjoint_matmat(A, Q, step)
    T = Z.T @ Omega
    QS, ZS = Q @ S, Z @ S

    # With Q_(i) Q_(i)^T = Q Q^T - (Q s_i)(Q s_i)^T:
    #   diag(Q_(i) Q_(i)^T A) = diag(Q Z^T) - (Q s_i) ⊙ (Z s_i), and
    #   (I - Q_(i) Q_(i)^T) A ω_i = y_i - Q t_i + (s_i^T t_i) Q s_i.
    exact_part = (Q * Z).sum(dim=1)
    samples = -QS * ZS + Omega * (Y - Q @ T + QS * (S * T).sum(dim=0))

    # An odd budget: one more vector with the full sketch, Q_(k+1) = Q.
    if num_matvecs % 2 == 1:
        omega = sample_probes(n, 1, distribution, generator, A.dtype, A.device)
        extra = omega * (A.matmat(omega) - Q @ (Z.T @ omega))
        samples = torch.cat([samples, extra], dim=1)

    info = {"sketch_size": k}
    return DiagonalSamples(exact_part, iter([samples]), num_matvecs, samples.shape[1], info)


def _running_moments(batches: Iterator[torch.Tensor]):
    """Return per-entry mean, sum of squared deviations and count, merged batch by batch in float64.

    Batches merge with the pairwise update of Chan, Golub and LeVeque, so
    the variance is accurate even when it is tiny next to the mean.
    """
    mean = m2 = None
    count = 0
    for batch in batches:
        batch = batch.double()
        b = batch.shape[1]
        batch_mean = batch.mean(dim=1)
        batch_m2 = ((batch - batch_mean[:, None]) ** 2).sum(dim=1)
        if mean is None:
            mean, m2, count = batch_mean, batch_m2, b
            continue
        delta = batch_mean - mean
        total = count + b
        mean = mean + delta * (b / total)
        m2 = m2 + batch_m2 + delta**2 * (count * b / total)
        count = total
    return mean, m2, count


def _std_error_from_moments(m2: torch.Tensor, count: int) -> torch.Tensor:
    if count < 2:
        return torch.full_like(m2, math.nan)
    return torch.sqrt(m2 / (count - 1) / count)
