"""hutch: Hessian traces of PyTorch models, matrix-free, with standard errors.

The pieces, in the order a user meets them:

- :class:`HessianOperator` turns a model, a loss and data into a linear
  operator whose products are Hessian-vector products.
- :func:`hutchinson` and :func:`hutchpp` estimate the trace of any square
  linear operator and return a :class:`TraceEstimate` with a standard error.
- :func:`exact_trace`, :func:`exact_diagonal` and
  :meth:`HessianOperator.to_dense` give exact values for small models.
- :func:`trace` is the one-line call for a model.
"""

from hutch.adaptive import ToleranceWarning, adaptive_trace
from hutch.api import trace
from hutch.blocks import BlockTraces, block_traces
from hutch.diagonal import DiagonalEstimate, diagonal
from hutch.exact import exact_diagonal, exact_trace
from hutch.hutchinson import hutchinson
from hutch.hutchpp import hutchpp
from hutch.layout import ParameterLayout, ParameterSlot
from hutch.linop import DenseOperator, LinearOperator, as_linear_operator
from hutch.operator import HessianOperator
from hutch.result import TraceEstimate
from hutch.xtrace import xnystrace, xtrace

__version__ = "0.1.0"

__all__ = [
    # Operators
    "HessianOperator",
    "ParameterLayout",
    "ParameterSlot",
    "LinearOperator",
    "DenseOperator",
    "as_linear_operator",
    # Estimators
    "hutchinson",
    "hutchpp",
    "xtrace",
    "xnystrace",
    "adaptive_trace",
    "ToleranceWarning",
    "trace",
    "TraceEstimate",
    # Per-block traces and diagonals
    "block_traces",
    "BlockTraces",
    "diagonal",
    "DiagonalEstimate",
    # Exact references
    "exact_trace",
    "exact_diagonal",
]
