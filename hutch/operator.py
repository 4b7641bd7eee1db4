"""The matrix-free Hessian of a model's loss with respect to its parameters."""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from hutch._data import Batch, normalize_data
from hutch._forward import (
    batch_norm_overrides,
    batch_seed,
    frozen_randomness,
    math_attention,
    seed_from_generator,
)
from hutch._hvp import (
    AUTO,
    FORWARD_OVER_REVERSE,
    HVP_PATHS,
    REVERSE_OVER_REVERSE,
    ForwardOverReverse,
    HVPError,
    HVPFallbackWarning,
    HVPMismatchError,
    LossFunction,
    NonFiniteHVPError,
    PathComparison,
    ReverseOverReverse,
    UnsupportedOperationError,
    compare_products,
    first_line,
    is_autodiff_failure,
    name_operation,
    workaround,
)
from hutch._memory import memory_budget, plan_memory
from hutch.layout import ParameterLayout

__all__ = [
    "HessianOperator",
    "HVP_PATHS",
    "HVPError",
    "HVPFallbackWarning",
    "HVPMismatchError",
    "NonFiniteHVPError",
    "PathComparison",
    "UnsupportedOperationError",
]

logger = logging.getLogger("hutch")

# to_dense() rejects matrices larger than this unless the caller raises max_bytes.
DEFAULT_MAX_DENSE_BYTES = 2**30

REDUCTIONS = ("mean", "sum")

# Columns of the first product that cross_check=True runs along both paths.
CROSS_CHECK_COLUMNS = 4


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

    Nothing of size P × P is formed. Each product :math:`H V` is summed over
    the data batches, and on each batch it runs one of two paths over the
    columns of V in chunks of ``batch_size`` columns:

    - ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``
      of a ``functional_call`` of the model, vectorized with
      ``torch.func.vmap``. Every chunk reruns the forward and backward pass,
      and some operations lack the forward-mode derivatives it needs:
      mean-reduced ``F.mse_loss``, ``grid_sample``, custom
      ``torch.autograd.Function`` classes without a ``jvp``.
    - ``"reverse-over-reverse"``: the vector-Jacobian product of the
      gradient. The gradient is built once with ``create_graph=True`` and
      each product is one more backward pass through its graph. Columns go
      one at a time on the CPU, where that measured fastest, and through
      ``torch.autograd.grad(..., is_grads_batched=True)`` on other devices,
      one at a time again where the backward graph cannot be vectorized.

    The gradient graph of reverse-over-reverse is kept between calls, so
    every product of an estimate reuses one forward and backward pass, when
    the data is one batch held in memory (a single ``(inputs, targets)``
    pair or a list of one) and the graph fits in ``memory_budget`` beside
    one chunk. It is rebuilt when a parameter or buffer of the model is
    changed or replaced (an optimizer step), when a module's training flag,
    the data tensors or the forward seed change, and is dropped by
    :meth:`clear_cache`. With several batches, or a ``DataLoader``, each
    batch's graph lives for one matmat call only: keeping all of them would
    hold every batch's activations at once.

    With ``hvp="auto"`` the first product checks forward-over-reverse on its
    first column, when one such product fits in ``memory_budget``. If that
    fails and reverse-over-reverse succeeds, the operator warns once with an
    :class:`~hutch.operator.HVPFallbackWarning` that names the failing
    operation. Either way, the other columns and all later products run
    reverse-over-reverse, which measured faster than forward-over-reverse
    on every CPU benchmark workload (an MLP, a CNN, a
    transformer encoder, ResNet-18), because it does not repeat the forward
    and backward pass per chunk. If reverse-over-reverse then fails or gives
    NaN or Inf entries where forward-over-reverse ran, ``"auto"`` uses
    forward-over-reverse from then on. :attr:`hvp_path` records the path
    that computed the last column of the last product. An operation that
    supports neither path raises an
    :class:`~hutch.operator.UnsupportedOperationError` naming it, and a
    product with NaN or Inf entries raises a
    :class:`~hutch.operator.NonFiniteHVPError` naming the parameters
    involved.

    Which Hessian is estimated follows the model's mode at the time of each
    product. Batch-norm layers in training mode normalize with each data
    batch's statistics; in eval mode, with their running statistics; the
    running statistics are never updated. Dropout and other randomness in
    the forward pass is frozen: data batch b draws from torch's generators
    seeded from (forward seed, b), so every product of one estimate sees the
    same masks, and the operator is the Hessian of the loss with those
    masks. The forward seed is ``seed`` when given; otherwise each estimator
    (:func:`hutch.hutchinson`, :func:`hutch.hutchpp`) derives it from its
    own generator, so an estimate is reproducible from the estimator's seed,
    and direct products use a seed drawn at construction. Torch's global
    random state is restored after every product. Scaled dot-product
    attention runs on its math backend during products, because the fused
    kernels support neither path.

    Vectors are flat, of length P: the selected parameters in
    ``model.named_parameters()`` order, each flattened row-major.
    :attr:`layout` records each parameter's name, shape and offset;
    :meth:`split` and :meth:`flatten` convert between flat vectors and
    per-parameter tensors.

    Products use the parameters' values at the time of the call, so an
    operator built once keeps following a model that is being trained.
    Device and dtype are those of the parameters; data batches are copied to
    that device as they are read, so in-place operations in the model never
    write into the caller's tensors.

    Args:
        model: The model. It is only read: no parameter, buffer, ``.grad``
            field, ``requires_grad`` flag or training flag is modified.
        loss_fn: ``loss_fn(model(inputs), targets)`` must return a 0-dim
            tensor.
        data: One ``(inputs, targets)`` batch, or an iterable of such
            batches (a list, a ``DataLoader``, a generator). A one-shot
            iterator is read once and kept in memory; a re-iterable one such
            as a ``DataLoader`` is read again for every product, so it must
            yield the same batches in the same order each time (no
            shuffling) for the products to be those of one matrix.
        params: Names of the parameters to differentiate with respect to,
            in any order (the flat order is always the model's). ``None``
            selects every parameter with ``requires_grad=True``. A named
            parameter is included even if its ``requires_grad`` is False.
            Parameters left out, and all buffers, are held fixed. A
            parameter shared by several modules is counted once, under its
            first name.
        reduction: How ``loss_fn`` reduces over the samples of a batch:
            ``"mean"`` (batches are weighted by their size) or ``"sum"``.
        batch_size: Columns per chunk in :meth:`matmat`. ``None`` sizes
            chunks to fit ``memory_budget``, from the parameter count and the
            activation sizes of one forward pass. The columns of one call
            are the caller's: an estimator holds its ``batch_size`` probes
            (default 32) and their products, two P-vectors each, so for a
            model of millions of parameters pass the estimator a small
            ``batch_size`` too.
        hvp: ``"auto"`` (default), ``"forward-over-reverse"`` or
            ``"reverse-over-reverse"``: the product path, as described
            above. A forced path that fails raises instead of falling back.
        memory_budget: Bytes of working memory for products, beyond the
            model and the data: it sizes the default chunks and decides
            whether the gradient graph is kept between calls. ``None``
            allows 1 GiB on the CPU or a quarter of the free memory on a
            GPU. A smaller budget trades speed for memory: with a budget
            below a kept graph plus one probe, each matmat call rebuilds the
            graph, and chunks shrink to one column; below one
            forward-over-reverse product, ``hvp="auto"`` skips its check of
            that path. The activations are bounded by the data's batches:
            pass a list of smaller batches to lower them.
        seed: Seed of the forward pass's randomness, a non-negative int.
            ``None`` lets each estimate choose it from its generator.
        cross_check: If True, the first product also runs on the other path
            for its first few columns, and an
            :class:`~hutch.operator.HVPMismatchError` is raised if the two
            disagree. :meth:`compare_paths` runs the same comparison on
            demand.

    Attributes:
        hvp_path: Name of the path that computed the last product; ``None``
            before the first product with ``hvp="auto"``.
        hvp_fallback: The operation that made forward-over-reverse fail, or
            ``None`` if it has not failed.
        forward_seed: The seed the forward pass's randomness is drawn from.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, ``loss_fn`` is not
            callable, ``cross_check`` is not a bool, or the parameters are not
            all of one real floating-point dtype and one device.
        ValueError: If a name in ``params`` is not a parameter of the model,
            no parameter is selected, ``data`` is empty or malformed, or
            ``reduction``, ``batch_size``, ``hvp``, ``seed`` or
            ``memory_budget`` is invalid.

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
        >>> _ = op.matvec(torch.ones(8))
        >>> op.hvp_path
        'forward-over-reverse'
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
        hvp: str = AUTO,
        seed: Optional[int] = None,
        cross_check: bool = False,
        memory_budget: Optional[int] = None,
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
        if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
        ):
            raise ValueError(
                f"memory_budget must be None or a positive int number of bytes; got {memory_budget!r}. "
                "For example memory_budget=2**28 allows 256 MiB"
            )
        _check_hvp_options(hvp, seed, cross_check)

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
        self.memory_budget = memory_budget
        self._keep_graph: Optional[bool] = None
        self._forward_fits: Optional[bool] = None
        self._kept: Optional[_KeptGraph] = None

        self.hvp = hvp
        self._paths = {
            FORWARD_OVER_REVERSE: ForwardOverReverse(),
            REVERSE_OVER_REVERSE: ReverseOverReverse(vectorize=self.device.type != "cpu"),
        }
        self._path = None if hvp == AUTO else self._paths[hvp]
        # The path that products after the first one take under hvp="auto".
        self._preferred = self._paths[REVERSE_OVER_REVERSE]
        self.hvp_fallback: Optional[str] = None
        self.cross_check = cross_check
        self._cross_check_pending = cross_check

        self.seed = seed
        if seed is None:
            seed = secrets.randbits(63)
            logger.debug("HessianOperator: forward seed %d until an estimator sets one", seed)
        self.forward_seed = seed

    @property
    def hvp_path(self) -> Optional[str]:
        """Name of the path that computed the last product; ``None`` before the first product with ``hvp="auto"``."""
        return None if self._path is None else self._path.name

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
        """Evaluate ``loss_fn`` on one batch with ``params`` substituted into the model.

        Normalization layers in training mode use batch statistics and leave
        the running statistics in ``fixed`` alone, attention runs on the
        math backend, and the model receives a copy of ``inputs``, as in
        every product.

        Raises:
            ValueError: If ``loss_fn`` does not return a 0-dim tensor.
        """
        overrides = batch_norm_overrides(self.model)
        with math_attention():
            # The copy is made inside any function transform, so an in-place
            # operation on the inputs (nn.ReLU(inplace=True) as the first
            # layer) writes to a tensor of the transform, not to a captured one.
            outputs = functional_call(self.model, (params, {**fixed, **overrides}), (inputs.clone(),))
            loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a 0-dim (scalar) tensor; got {shape}. Reduce it "
                "inside loss_fn, for example with reduction='mean' or .mean(); hutch never "
                "reduces a loss itself"
            )
        return loss

    def _batch_loss_function(self, index: int, fixed, inputs, targets) -> LossFunction:
        """Return the loss of data batch ``index`` as a function of the selected parameters.

        Each call draws its randomness from the same seed, so every product
        on this batch sees the same dropout masks.
        """
        seed = batch_seed(self.forward_seed, index)

        def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            with frozen_randomness(seed, self.device):
                return self.batch_loss(params, fixed, inputs, targets)

        return loss

    def begin_estimate(self, generator: torch.Generator) -> None:
        """Fix the forward pass's randomness for one estimate from the estimator's generator.

        Estimators call this once before their first product. The seed is
        derived from the generator's state without drawing from it, so the
        probes are the same as for any other operator. An operator built
        with ``seed`` keeps that seed.
        """
        if self.seed is None:
            self.forward_seed = seed_from_generator(generator)

    # --- products ---------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Columns per chunk in :meth:`matmat`."""
        if self._batch_size is None:
            self._plan_memory()
        return self._batch_size

    def _plan_memory(self) -> None:
        """Size the chunks (unless the caller did) and decide whether a gradient graph is kept."""
        first = next(iter(self._batches()), None)
        if first is None:
            raise ValueError("data yielded no batches; pass at least one (inputs, targets) batch")
        budget = memory_budget(self.device, self.memory_budget)
        chunk, fits, self._forward_fits = plan_memory(self, first, budget)
        if self._batch_size is None:
            self._batch_size = chunk
        self._keep_graph = fits and self._data_is_one_batch()
        logger.info(
            "HessianOperator: %d probes per chunk; gradient graph %s between calls (budget %d bytes)",
            self._batch_size, "kept" if self._keep_graph else "not kept", budget,
        )

    def _data_is_one_batch(self) -> bool:
        source = self._data._source
        return isinstance(source, (list, tuple)) and len(source) == 1

    def clear_cache(self) -> None:
        """Drop the kept gradient graph, freeing the activations and the gradient it holds.

        The next reverse-over-reverse product builds it again. Products
        never depend on whether a graph was kept.
        """
        self._kept = None

    def _batches(self) -> Iterator[Batch]:
        return self._data.batches(self.device)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``H @ V`` for ``V`` of shape ``(P, k)``.

        Raises:
            ValueError: If ``V`` does not have shape ``(P, k)``.
            TypeError: If ``V`` is not a tensor of the operator's dtype and
                device.
            UnsupportedOperationError: If an operation in the model or loss
                supports neither path (or not the forced one).
            NonFiniteHVPError: If a product has NaN or Inf entries.
            HVPMismatchError: With ``cross_check=True``, if the two paths
                disagree on the first product.
        """
        self._check_vector(V, ndim=2, arg="V")
        out = torch.empty(V.shape[1], self.num_params, dtype=self.dtype, device=self.device)
        return self._products(V, out, quadratic=False).T

    def quadratic_forms(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``v_i^T H v_i`` for each column ``v_i`` of ``V``, shape ``(k,)``.

        This is the diagonal of ``V^T H V``, the only thing Hutchinson's
        estimator needs, computed without holding ``H V``: each data
        batch's product with a chunk of columns is reduced to k numbers
        parameter by parameter and dropped. A trace over several data
        batches then never keeps a ``(P, k)`` result or running sum, which
        saves one to two gradients' worth of memory on a large model. The
        products are the same as :meth:`matmat`'s, along the same path.

        Args:
            V: Columns of shape ``(P, k)`` in the operator's dtype and on its
                device.

        Returns:
            A ``(k,)`` tensor in the operator's dtype; the sums over the
            parameters are accumulated in float64.

        Raises:
            The same errors as :meth:`matmat`.
        """
        self._check_vector(V, ndim=2, arg="V")
        out = torch.zeros(V.shape[1], dtype=torch.float64, device=self.device)
        return self._products(V, out, quadratic=True).to(self.dtype)

    def _products(self, V: torch.Tensor, out: torch.Tensor, quadratic: bool) -> torch.Tensor:
        """Fill ``out`` with ``(H V).T`` or, if ``quadratic``, with ``diag(V^T H V)``; return it."""
        if V.shape[1] == 0:
            return out
        if self._cross_check_pending:
            self._cross_check_pending = False
            self._run_cross_check(V[:, :CROSS_CHECK_COLUMNS])

        if self.hvp != AUTO:
            return self._matmat_forced(V, out, quadratic)
        if self._path is None and self._forward_check_fits():
            self._matmat_first(V[:, :1], out[:1], quadratic)
            if V.shape[1] == 1:
                return out
            V, rows = V[:, 1:], out[1:]
        else:
            rows = out
        self._matmat_preferred(V, rows, quadratic)
        return out

    def _forward_check_fits(self) -> bool:
        """Return whether ``hvp="auto"`` may check forward-over-reverse on one column within the memory budget.

        A forward-over-reverse product repeats the forward and backward
        pass with tangents, so on a large model one column can take more
        memory than all later reverse-over-reverse products. When the
        budget does not cover it, ``"auto"`` starts reverse-over-reverse
        and tries forward-over-reverse only if that fails.
        """
        if self._forward_fits is None:
            self._plan_memory()
        return self._forward_fits

    def _matmat_forced(self, V: torch.Tensor, out: torch.Tensor, quadratic: bool) -> torch.Tensor:
        try:
            return self._matmat_along(self._path, V, out=out, quadratic=quadratic)
        except HVPError:
            raise
        except (RuntimeError, NotImplementedError) as error:
            if not is_autodiff_failure(error):
                raise
            operation = name_operation(error, self._diagnose(self._path, V))
            other = REVERSE_OVER_REVERSE if self._path.name == FORWARD_OVER_REVERSE else FORWARD_OVER_REVERSE
            raise UnsupportedOperationError(
                f"{self._path.name} Hessian-vector products failed in {operation} "
                f"({type(error).__name__}: {first_line(error)}). The operator was built with "
                f"hvp={self.hvp!r}; pass hvp='auto' to fall back to {other} products "
                "automatically"
            ) from error

    def _matmat_first(self, V: torch.Tensor, out: torch.Tensor, quadratic: bool) -> None:
        """Check forward-over-reverse on the first product's first column, falling back if it fails."""
        forward = self._paths[FORWARD_OVER_REVERSE]
        reverse = self._paths[REVERSE_OVER_REVERSE]
        try:
            self._matmat_along(forward, V, out=out, quadratic=quadratic)
        except HVPError:
            raise
        except (RuntimeError, NotImplementedError) as forward_error:
            # Only a failure specific to forward mode leads to the other path:
            # if reverse-over-reverse fails too, the operation supports neither.
            try:
                self._matmat_along(reverse, V, out=out, quadratic=quadratic)
            except NonFiniteHVPError:
                self._fall_back(forward_error, V)
                raise
            except HVPError:
                raise
            except (RuntimeError, NotImplementedError) as reverse_error:
                if first_line(reverse_error) == first_line(forward_error):
                    # The same error on both paths comes from the model or
                    # the data, not from a missing derivative.
                    raise
                raise self._unsupported(forward_error, reverse_error, V) from reverse_error
            self._fall_back(forward_error, V)
            return
        self._path = forward

    def _matmat_preferred(self, V: torch.Tensor, out: torch.Tensor, quadratic: bool) -> None:
        """Run ``hvp="auto"`` products after the first along the preferred path.

        Reverse-over-reverse is preferred; where it fails, or gives NaN or
        Inf entries, and forward-over-reverse is known to work, the products
        go forward-over-reverse from then on.
        """
        path = self._preferred
        forward = self._paths[FORWARD_OVER_REVERSE]
        try:
            self._matmat_along(path, V, out=out, quadratic=quadratic)
        except (NonFiniteHVPError, RuntimeError, NotImplementedError) as error:
            retry = (
                path is not forward
                and self.hvp_fallback is None
                and (isinstance(error, NonFiniteHVPError) or (not isinstance(error, HVPError) and is_autodiff_failure(error)))
            )
            if not retry:
                raise
            logger.info(
                "HessianOperator: reverse-over-reverse products failed (%s: %s); using "
                "forward-over-reverse products from now on", type(error).__name__, first_line(error),
            )
            self._preferred = path = forward
            self._matmat_along(path, V, out=out, quadratic=quadratic)
        self._path = path

    def _matmat_along(
        self, path, V: torch.Tensor, check_finite: bool = True, out: Optional[torch.Tensor] = None,
        keep: bool = True, quadratic: bool = False,
    ) -> torch.Tensor:
        """Return ``(H @ V).T``, shape ``(k, P)``, computed along ``path``, written into ``out`` if given.

        With ``quadratic=True``, ``out`` is a float64 tensor of shape
        ``(k,)`` and receives ``diag(V^T H V)`` instead. ``keep=False``
        neither uses nor stores a kept gradient graph.
        """
        k = V.shape[1]
        if out is None:
            out = torch.empty(k, self.num_params, dtype=self.dtype, device=self.device)
        if quadratic:
            # Batches add into out, and a path that failed part-way may have written to it.
            out.zero_()
        chunk = self.batch_size
        rows = V.T
        total_weight = 0

        # Data batches form the outer loop so a DataLoader is read once per matmat.
        for index, num_samples, apply in self._batch_products(path, keep):
            weight = num_samples if self.reduction == "mean" else 1
            total_weight += num_samples
            for start in range(0, k, chunk):
                tangents = self.layout.split(rows[start : start + chunk])
                products = apply(tangents)
                if quadratic:
                    forms = self._reduce(products, tangents, index, path.name, check_finite)
                    out[start : start + chunk].add_(forms, alpha=weight)
                    del products, forms
                    continue
                target = out[start : start + chunk]
                if index == 0:
                    torch.cat([products[s.name].reshape(target.shape[0], -1) for s in self.layout], dim=1, out=target)
                    flat = target
                else:
                    flat = self.layout.flatten(products, batch_dims=1)
                del products
                if check_finite:
                    self._check_finite(flat, index, path.name)
                if index == 0:
                    if weight != 1:
                        target.mul_(weight)
                else:
                    target.add_(flat, alpha=weight)
                del flat
            del apply

        if total_weight == 0:
            raise ValueError("data yielded no batches; pass at least one (inputs, targets) batch")
        if self.reduction == "mean":
            out /= total_weight
        return out

    def _reduce(self, products, tangents, index: int, path: str, check_finite: bool) -> torch.Tensor:
        """Return ``sum over parameters of <t_i, (H t)_i>`` per tangent, in float64, shape ``(c,)``.

        Each parameter's block is reduced with a batched dot product, so no
        temporary of the block's size is made. A NaN or Inf entry of a
        product makes its parameter's sum non-finite, because no probe entry
        is zero, so the check on the sums finds what the check on the
        products would.
        """
        sums = []
        for slot in self.layout:
            product = products[slot.name].reshape(-1, 1, slot.numel)
            tangent = tangents[slot.name].reshape(-1, slot.numel, 1)
            sums.append(torch.bmm(product, tangent).reshape(-1).double())
        sums = torch.stack(sums)
        if check_finite and not bool(torch.isfinite(sums).all()):
            names = [slot.name for slot, row in zip(self.layout, sums) if not bool(torch.isfinite(row).all())]
            self._raise_non_finite(names, index, path)
        return sums.sum(dim=0)

    def _batch_products(self, path, keep: bool) -> Iterator[tuple[int, int, Callable]]:
        """Yield ``(batch index, samples, block product)`` for each data batch, reusing a kept graph."""
        params = self._current_params()
        if keep and path.keeps_state and self._graph_can_be_kept():
            key = self._state_key(path.name)
            if self._kept is None or not self._kept.matches(key):
                # The old graph is freed before the new one is built.
                self._kept = None
                batch = next(iter(self._batches()))
                apply = path.prepare(self._fresh_loss(0, batch), params)
                self._kept = _KeptGraph(key, batch.num_samples, apply)
                logger.debug("HessianOperator: built and kept the %s gradient graph", path.name)
            yield 0, self._kept.num_samples, self._kept.apply
            return

        for index, batch in enumerate(self._batches()):
            yield index, batch.num_samples, path.prepare(self._fresh_loss(index, batch), params)

    def _fresh_loss(self, index: int, batch: Batch) -> LossFunction:
        # Buffers are copied per batch, so a model that writes to its
        # buffers during the forward pass writes to the copies.
        fixed = {name: t.clone() for name, t in self._fixed_tensors().items()}
        return self._batch_loss_function(index, fixed, batch.inputs, batch.targets)

    def _graph_can_be_kept(self) -> bool:
        if self._keep_graph is None:
            self._plan_memory()
        return self._keep_graph

    def _state_key(self, path_name: str) -> tuple:
        """Everything a kept gradient graph depends on besides the loss function."""
        tensors = [p for _, p in self.model.named_parameters()] + [b for _, b in self.model.named_buffers()]
        tensors += [t for t in self._data._source[0] if isinstance(t, torch.Tensor)]
        flags = tuple(m.training for m in self.model.modules())
        return (path_name, self.forward_seed, flags, tuple(_TensorState(t) for t in tensors))

    def _check_finite(self, flat: torch.Tensor, index: int, path: str) -> None:
        finite = torch.isfinite(flat)
        if bool(finite.all()):
            return
        names = [s.name for s in self.layout if not bool(finite[:, s.offset : s.stop].all())]
        self._raise_non_finite(names, index, path)

    @staticmethod
    def _raise_non_finite(names: list[str], index: int, path: str) -> None:
        raise NonFiniteHVPError(
            f"{path} Hessian-vector products on data batch {index} have NaN or Inf entries "
            f"for parameters {names}. The loss is not twice differentiable at the current "
            "parameter values (for example a norm at zero, whose gradient is undefined there) "
            "or overflows. Check the loss and these parameters; HessianOperator(..., "
            "cross_check=True) compares both product paths"
        )

    def _diagnose(self, path, V: torch.Tensor) -> Callable[[], None]:
        """Return a callable that reruns one product along ``path`` on one column, for naming a failure."""

        def rerun() -> None:
            self._matmat_along(path, V[:, :1], check_finite=False, keep=False)

        return rerun

    def _fall_back(self, forward_error: BaseException, V: torch.Tensor) -> None:
        operation = name_operation(forward_error, self._diagnose(self._paths[FORWARD_OVER_REVERSE], V))
        self._path = self._paths[REVERSE_OVER_REVERSE]
        self.hvp_fallback = operation
        warnings.warn(
            f"forward-over-reverse Hessian-vector products failed in {operation} "
            f"({type(forward_error).__name__}: {first_line(forward_error)}); this operator "
            "uses reverse-over-reverse products from now on. Pass "
            "hvp='reverse-over-reverse' to skip the attempt and this warning",
            HVPFallbackWarning,
            stacklevel=4,
        )
        logger.info("HessianOperator: falling back to reverse-over-reverse products (%s)", operation)

    def _unsupported(self, forward_error, reverse_error, V: torch.Tensor) -> UnsupportedOperationError:
        operation = name_operation(reverse_error, self._diagnose(self._paths[REVERSE_OVER_REVERSE], V))
        forward_operation = name_operation(forward_error)
        fix = workaround(operation) or workaround(forward_operation)
        message = (
            f"Hessian-vector products are not available for this model: {operation} has no "
            "second derivative in torch along either path (forward-over-reverse failed in "
            f"{forward_operation}: {first_line(forward_error)}; reverse-over-reverse failed: "
            f"{first_line(reverse_error)})."
        )
        if fix:
            message += f" Workaround: {fix}"
        return UnsupportedOperationError(message)

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

    # --- comparing the two paths ------------------------------------------

    def compare_paths(self, V: torch.Tensor, rtol: Optional[float] = None) -> PathComparison:
        """Compute ``H @ V`` along both paths and compare the results.

        Neither path's failure is raised: a path that cannot run is listed
        in the result's ``errors``. This does not change :attr:`hvp_path`.

        Args:
            V: Tangents of shape ``(P, k)``; a few columns suffice.
            rtol: Tolerance relative to the largest entry of either product;
                default ``sqrt(eps)`` of the operator's dtype (about 1.5e-8
                in float64 and 3.5e-4 in float32).

        Returns:
            A :class:`~hutch.operator.PathComparison`.
        """
        self._check_vector(V, ndim=2, arg="V")
        if rtol is None:
            rtol = math.sqrt(torch.finfo(self.dtype).eps)
        products, errors = {}, {}
        for name in (FORWARD_OVER_REVERSE, REVERSE_OVER_REVERSE):
            try:
                products[name] = self._matmat_along(self._paths[name], V, check_finite=False)
            except HVPError:
                raise
            except (RuntimeError, NotImplementedError) as error:
                products[name] = None
                errors[name] = f"{name_operation(error)}: {first_line(error)}"
        return compare_products(products, self.layout, rtol, errors)

    def _run_cross_check(self, V: torch.Tensor) -> None:
        comparison = self.compare_paths(V)
        if not comparison.complete:
            logger.info("HessianOperator: cross-check skipped, a path cannot run: %s", comparison.errors)
            return
        if not comparison.agree:
            raise HVPMismatchError(
                f"forward-over-reverse and reverse-over-reverse Hessian-vector products disagree "
                f"for parameters {comparison.mismatched}: {comparison.describe()}. The loss is "
                "not twice differentiable at the current parameters, or one path is wrong for an "
                "operation in the model"
            )
        logger.info(
            "HessianOperator: cross-check passed, largest difference %.3g", comparison.max_abs_diff
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


def _check_hvp_options(hvp, seed, cross_check) -> None:
    if hvp not in HVP_PATHS:
        raise ValueError(f"hvp must be one of {list(HVP_PATHS)}; got {hvp!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be None or a non-negative int; got {seed!r}")
    if not isinstance(cross_check, bool):
        raise TypeError(f"cross_check must be True or False; got {cross_check!r}")


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


class _TensorState:
    """A tensor's identity, storage and version counter, compared by identity, not by value."""

    __slots__ = ("tensor", "pointer", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.pointer = tensor.data_ptr()
        self.version = tensor._version

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, _TensorState)
            and self.tensor is other.tensor
            and self.pointer == other.pointer
            and self.version == other.version
        )

    __hash__ = None


class _KeptGraph:
    """A prepared block product of the one data batch, with the state it was built from."""

    def __init__(self, key: tuple, num_samples: int, apply: Callable):
        self.key = key
        self.num_samples = num_samples
        self.apply = apply

    def matches(self, key: tuple) -> bool:
        return self.key == key
