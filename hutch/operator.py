"""The matrix-free Hessian of a model's loss with respect to its parameters."""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from hutch._data import Batch, normalize_data
from hutch._memory import default_probe_chunk
from hutch.layout import ParameterLayout

logger = logging.getLogger("hutch")

# to_dense() rejects matrices larger than this unless the caller raises max_bytes.
DEFAULT_MAX_DENSE_BYTES = 2**30

REDUCTIONS = ("mean", "sum")


class HessianOperator:
    r"""The Hessian of a loss with respect to model parameters, as a linear operator.

    For parameters :math:`\theta \in \mathbb{R}^P` and batches
    :math:`(x_b, y_b)` with :math:`n_b` samples each, the operator is the
    Hessian of

    .. math::
        L(\theta) = \frac{\sum_b n_b \, \ell(f_\theta(x_b), y_b)}{\sum_b n_b}

    for ``reduction="mean"`` (a mean-reduced loss over all N samples,
    whatever the batching), or :math:`\sum_b \ell(f_\theta(x_b), y_b)` for
    ``reduction="sum"``. Here :math:`f_\theta` is ``model`` and
    :math:`\ell` is ``loss_fn``.

    Nothing of size P × P is formed. Each product :math:`H V` runs
    ``torch.func.jvp`` of ``torch.func.grad`` of a ``functional_call`` of the
    model (forward-over-reverse), vectorized over the columns of V with
    ``torch.func.vmap`` in chunks of ``batch_size`` columns, and summed over
    the data batches.

    Vectors are flat, of length P: the selected parameters in
    ``model.named_parameters()`` order, each flattened row-major.
    :attr:`layout` records each parameter's name, shape and offset;
    :meth:`split` and :meth:`flatten` convert between flat vectors and
    per-parameter tensors.

    Products use the parameters' values at the time of the call, so an
    operator built once keeps following a model that is being trained.
    Device and dtype are those of the parameters; data batches are moved to
    that device as they are read.

    Args:
        model: The model. It is only read: no parameter, buffer or ``.grad``
            field is modified.
        loss_fn: ``loss_fn(model(inputs), targets)`` must return a 0-dim
            tensor.
        data: One ``(inputs, targets)`` batch, or an iterable of such
            batches (a list, a ``DataLoader``, a generator). A one-shot
            iterator is read once and kept in memory; a re-iterable one such
            as a ``DataLoader`` is read again for every product.
        params: Names of the parameters to differentiate with respect to,
            in any order (the flat order is always the model's). ``None``
            selects every parameter with ``requires_grad=True``. A named
            parameter is included even if its ``requires_grad`` is False.
            Parameters left out, and all buffers, are held fixed.
        reduction: How ``loss_fn`` reduces over the samples of a batch:
            ``"mean"`` (batches are weighted by their size) or ``"sum"``.
        batch_size: Columns per vectorized chunk in :meth:`matmat`. ``None``
            sizes chunks from the parameter count and the activation sizes
            of one forward pass, to stay within about 1 GiB on the CPU or a
            quarter of free memory on a GPU.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, ``loss_fn`` is not
            callable, or the parameters are not all of one real
            floating-point dtype and one device.
        ValueError: If a name in ``params`` is not a parameter of the model,
            no parameter is selected, ``data`` is empty or malformed, or
            ``reduction`` is invalid.

    Example:
        >>> import torch, hutch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> op = hutch.HessianOperator(model, torch.nn.functional.cross_entropy, data)
        >>> op.shape
        (8, 8)
        >>> op.layout.names
        ['weight', 'bias']
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data,
        params: Optional[Iterable[str]] = None,
        *,
        reduction: str = "mean",
        batch_size: Optional[int] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, targets); got {type(loss_fn).__name__}"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(REDUCTIONS)}; got {reduction!r}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be None or a positive int; got {batch_size!r}")

        self.model = model
        self.loss_fn = loss_fn
        self.reduction = reduction
        self._data = normalize_data(data)
        self._names = _select_parameters(model, params)

        named = dict(model.named_parameters())
        selected = [named[name] for name in self._names]
        self.dtype, self.device = _common_dtype_and_device(self._names, selected)
        self.layout = ParameterLayout([(name, p.shape) for name, p in zip(self._names, selected)])
        self.num_params = self.layout.num_params
        self.shape = (self.num_params, self.num_params)
        self._batch_size = batch_size

        # The function transforms are built once; only their inputs change per product.
        self._hvp_chunk = vmap(self._hvp_single, in_dims=(0, None, None, None))
        self.hvp_path = "forward-over-reverse"

    # --- the loss as a function of the selected parameters -----------------

    def _fixed_tensors(self) -> dict[str, torch.Tensor]:
        """Buffers and unselected parameters, passed to the model unchanged."""
        fixed = {name: b for name, b in self.model.named_buffers()}
        selected = set(self._names)
        for name, p in self.model.named_parameters():
            if name not in selected:
                fixed[name] = p.detach()
        return fixed

    def _current_params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {name: named[name].detach() for name in self._names}

    def batch_loss(self, params: dict[str, torch.Tensor], fixed, inputs, targets) -> torch.Tensor:
        """Evaluate ``loss_fn`` on one batch with ``params`` substituted into the model."""
        outputs = functional_call(self.model, (params, fixed), (inputs,))
        loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a 0-dim (scalar) tensor; got {shape}. Reduce it "
                "inside loss_fn, for example with reduction='mean' or .mean()"
            )
        return loss

    def _hvp_single(self, tangent, params, fixed, batch):
        inputs, targets = batch

        def gradient(p):
            return grad(self.batch_loss)(p, fixed, inputs, targets)

        return jvp(gradient, (params,), (tangent,))[1]

    # --- products ---------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Columns per vectorized chunk in :meth:`matmat`."""
        if self._batch_size is None:
            first = next(iter(self._batches()))
            self._batch_size = default_probe_chunk(self, first)
            logger.info("HessianOperator: %d probes per vectorized chunk", self._batch_size)
        return self._batch_size

    def _batches(self) -> Iterator[Batch]:
        return self._data.batches(self.device)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``H @ V`` for ``V`` of shape ``(P, k)``.

        Raises:
            ValueError: If ``V`` does not have shape ``(P, k)``.
            TypeError: If ``V`` is not a tensor of the operator's dtype and
                device.
        """
        self._check_vector(V, ndim=2, arg="V")
        k = V.shape[1]
        out = torch.zeros(k, self.num_params, dtype=self.dtype, device=self.device)
        if k == 0:
            return out.T

        params = self._current_params()
        fixed = self._fixed_tensors()
        chunk = self.batch_size
        rows = V.T
        total_weight = 0

        # Data batches form the outer loop so a DataLoader is read once per matmat.
        for inputs, targets, num_samples in self._batches():
            weight = num_samples if self.reduction == "mean" else 1
            total_weight += num_samples
            for start in range(0, k, chunk):
                tangents = self.layout.split(rows[start : start + chunk])
                products = self._hvp_chunk(tangents, params, fixed, (inputs, targets))
                out[start : start + chunk] += weight * self.layout.flatten(products, batch_dims=1)

        if total_weight == 0:
            raise ValueError("data yielded no batches; pass at least one (inputs, targets) batch")
        if self.reduction == "mean":
            out /= total_weight
        return out.T

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``H @ v`` for ``v`` of shape ``(P,)``."""
        self._check_vector(v, ndim=1, arg="v")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        if isinstance(other, torch.Tensor) and other.ndim == 1:
            return self.matvec(other)
        return self.matmat(other)

    def _check_vector(self, V, ndim: int, arg: str) -> None:
        expected = "(P,)" if ndim == 1 else "(P, k)"
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor of shape {expected}; got {type(V).__name__}")
        if V.ndim != ndim or V.shape[0] != self.num_params:
            raise ValueError(
                f"{arg} has shape {tuple(V.shape)}; expected {expected} with "
                f"P = {self.num_params}, the number of selected parameters"
            )
        if V.dtype != self.dtype or V.device != self.device:
            raise TypeError(
                f"{arg} has dtype {V.dtype} on {V.device}; the operator works in "
                f"{self.dtype} on {self.device}. Convert it with "
                f"{arg}.to(dtype=op.dtype, device=op.device)"
            )

    # --- exact path and conversions ---------------------------------------

    def to_dense(self, *, max_bytes: int = DEFAULT_MAX_DENSE_BYTES) -> torch.Tensor:
        """Assemble the ``(P, P)`` Hessian from products with the identity's columns.

        Column i is ``H e_i``; the columns are computed in chunks of
        :attr:`batch_size`, so the identity is never stored whole.

        Args:
            max_bytes: Largest matrix, in bytes, to build; default 1 GiB.

        Raises:
            ValueError: If the matrix would take more than ``max_bytes``.
        """
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        needed = self.num_params**2 * itemsize
        if needed > max_bytes:
            raise ValueError(
                f"to_dense() would build a {self.num_params} x {self.num_params} matrix "
                f"of {self.dtype}, {needed / 2**20:.1f} MiB, above max_bytes={max_bytes} "
                f"({max_bytes / 2**20:.1f} MiB). Pass a larger max_bytes to build it anyway, "
                "or use hutch.exact_trace(op), which never stores the matrix"
            )
        H = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        step = max(self.batch_size, 1) * 4
        for start in range(0, self.num_params, step):
            stop = min(start + step, self.num_params)
            E = torch.zeros(self.num_params, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
            H[:, start:stop] = self.matmat(E)
        return H

    def to_scipy(self):
        """Return a ``scipy.sparse.linalg.LinearOperator`` that takes and returns NumPy arrays.

        Inputs are converted to the operator's dtype and device, and results
        come back as NumPy arrays on the CPU, so scipy's solvers, such as
        ``eigsh``, work on the Hessian directly.
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        def apply(x: np.ndarray) -> np.ndarray:
            X = torch.as_tensor(np.asarray(x), device=self.device).to(self.dtype)
            product = self.matmat(X.reshape(self.num_params, -1))
            return product.reshape(X.shape).cpu().numpy()

        numpy_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        # The Hessian is symmetric, so the adjoint product is the product.
        return ScipyLinearOperator(
            self.shape, matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply, dtype=numpy_dtype
        )

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``(P,)`` or block ``(k, P)`` into per-parameter tensors."""
        return self.layout.split(flat)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into a flat vector of length P."""
        return self.layout.flatten(tensors)

    def block(self, matrix: torch.Tensor, row: str, col: str) -> torch.Tensor:
        """Extract the block of a ``(P, P)`` matrix for two parameters, as ``torch.func.hessian`` shapes it."""
        return self.layout.block(matrix, row, col)

    def __repr__(self) -> str:
        return (
            f"HessianOperator(num_params={self.num_params}, dtype={self.dtype}, "
            f"device={self.device}, reduction={self.reduction!r}, hvp_path={self.hvp_path!r})"
        )


def _select_parameters(model: nn.Module, params: Optional[Iterable[str]]) -> list[str]:
    """Return the selected parameter names in ``named_parameters()`` order."""
    named = dict(model.named_parameters())
    if params is None:
        names = [name for name, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError(
                "model has no parameter with requires_grad=True; pass params=[...] to name "
                "the parameters to differentiate"
            )
        return names

    if isinstance(params, str):
        raise TypeError(
            f"params must be an iterable of parameter names, not a single string; got "
            f"{params!r}. Use params=[{params!r}]"
        )
    requested = list(params)
    aliases = _tied_aliases(model)
    for name in requested:
        if not isinstance(name, str):
            raise TypeError(
                f"params must contain parameter names (str); got {type(name).__name__} {name!r}"
            )
        if name in aliases:
            raise ValueError(
                f"parameter {name!r} is tied to {aliases[name]!r} and counted once under that "
                f"name; use {aliases[name]!r} in params"
            )
        if name not in named:
            raise ValueError(
                f"parameter {name!r} is not a parameter of the model; available names are "
                f"{list(named)}"
            )
    if not requested:
        raise ValueError("params is empty; name at least one parameter, or pass None for all")
    duplicates = sorted({n for n in requested if requested.count(n) > 1})
    if duplicates:
        raise ValueError(f"params names {duplicates} more than once; list each parameter once")
    chosen = set(requested)
    return [name for name in named if name in chosen]


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Map the second and later names of shared parameters to the first name."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first_name:
            aliases[name] = first_name[id(p)]
        else:
            first_name[id(p)] = name
    return aliases


def _common_dtype_and_device(names: Sequence[str], tensors: Sequence[torch.Tensor]):
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    bad = [(n, t.dtype) for n, t in zip(names, tensors) if not t.dtype.is_floating_point]
    if bad:
        raise TypeError(
            f"parameters must have a real floating-point dtype; got {bad}. Leave them out "
            "with params=[...] or convert the model, for example with model.double()"
        )
    if len(dtypes) > 1:
        found = {n: str(t.dtype) for n, t in zip(names, tensors)}
        raise TypeError(
            f"selected parameters have mixed dtypes {found}; convert the model to one "
            "dtype, for example with model.double()"
        )
    if len(devices) > 1:
        found = {n: str(t.device) for n, t in zip(names, tensors)}
        raise TypeError(
            f"selected parameters are on several devices {found}; move the model to one "
            "device with model.to(device)"
        )
    return dtypes.pop(), devices.pop()
