"""The linear-operator protocol that every estimator in hutch accepts.

An estimator needs only four things from an operator ``A``: its ``shape``
``(n, n)``, its ``dtype`` and ``device``, and ``matmat(V)``, the product with
an ``(n, k)`` block of vectors. A :class:`~hutch.HessianOperator`, a square
``torch.Tensor`` and any user object with those attributes all qualify, so
estimators can be tested on matrices with known spectra and then run on a
model's Hessian unchanged.

An operator may also offer ``quadratic_forms(V)``, returning
``v_i^T A v_i`` for each column without holding ``A V``. Hutchinson's
estimator needs nothing else, and :class:`~hutch.HessianOperator` computes
these numbers parameter by parameter, which saves the memory of the
``(n, k)`` product on a large model. Operators without it are reduced from
``matmat``.
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    """A square linear operator that multiplies blocks of column vectors."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A @ V`` for ``V`` of shape ``(n, k)``."""
        ...


OperatorLike = Union[LinearOperator, torch.Tensor]


class DenseOperator:
    """A square matrix seen through the linear-operator protocol.

    Args:
        matrix: A floating-point tensor of shape ``(n, n)``.
    """

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V

    def __repr__(self) -> str:
        return f"DenseOperator(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def quadratic_forms(A: LinearOperator, V: torch.Tensor) -> torch.Tensor:
    """Return ``v_i^T A v_i`` for each column of ``V`` ``(n, k)``, shape ``(k,)``.

    Uses ``A.quadratic_forms`` when the operator has it; otherwise reduces
    ``A.matmat(V)`` column by column with a batched dot product, which
    makes no temporary of ``V``'s size.
    """
    method = getattr(A, "quadratic_forms", None)
    if callable(method):
        forms = method(V)
        if not isinstance(forms, torch.Tensor) or tuple(forms.shape) != (V.shape[1],):
            got = tuple(forms.shape) if isinstance(forms, torch.Tensor) else type(forms).__name__
            raise ValueError(
                f"{type(A).__name__}.quadratic_forms returned {got} for {V.shape[1]} columns; it "
                f"must return a tensor of shape ({V.shape[1]},), one v^T A v per column"
            )
        return forms
    products = A.matmat(V)
    return torch.bmm(V.T.unsqueeze(1), products.T.unsqueeze(2)).reshape(-1)


def as_linear_operator(A: object, arg: str = "A") -> LinearOperator:
    """Check ``A`` and return it as an object with ``shape``, ``dtype``, ``device`` and ``matmat``.

    Raises:
        TypeError: If ``A`` is neither a tensor nor an object with the four
            attributes, or its dtype is not a real floating-point type.
        ValueError: If ``A`` is not square.
    """
    if isinstance(A, torch.Tensor):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(
                f"{arg} must be a square matrix of shape (n, n); got a tensor of shape "
                f"{tuple(A.shape)}"
            )
        operator = DenseOperator(A)
    else:
        missing = [name for name in ("shape", "dtype", "device", "matmat") if not hasattr(A, name)]
        if missing:
            raise TypeError(
                f"{arg} must be a square torch.Tensor or a linear operator with shape, "
                f"dtype, device and matmat; got {type(A).__name__}, which lacks {missing}"
            )
        operator = A
        shape = tuple(operator.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"{arg} must be square; got an operator of shape {shape}")

    if not operator.dtype.is_floating_point:
        raise TypeError(
            f"{arg} must have a real floating-point dtype; got {operator.dtype}. "
            "Convert it, for example with .double()"
        )
    return operator
