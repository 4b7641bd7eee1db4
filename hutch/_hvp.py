"""Hessian-vector product paths, and naming the operation that makes one fail.

A path turns a scalar function of named parameters into products
:math:`H T` with blocks of tangents T. It does so in two steps:
:meth:`prepare` does the work that does not depend on the tangents, and the
function it returns multiplies one block of tangents at a time. Two paths
exist:

- forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad``,
  vectorized over the tangents with ``torch.func.vmap``. Each block reruns
  the primal forward and backward pass once, then pushes every tangent of
  the block through both, at about two gradients per product. It needs
  forward-mode AD for every operation in the backward pass.
- reverse-over-reverse: the vector-Jacobian product of the gradient.
  Preparing builds the gradient once with ``torch.autograd.grad(...,
  create_graph=True)`` and keeps its graph (a :class:`GradientGraph`);
  each product is then one backward pass through that graph, at about one
  gradient per product, because the primal forward and backward pass are
  not repeated. A block of tangents is differentiated at once with
  ``is_grads_batched=True`` where the path is vectorized, or one tangent
  at a time. It needs only a twice differentiable backward pass, and works
  with ``torch.autograd.Function`` classes of either style.

Each path is a class with a ``name`` and a ``prepare`` method; ``PATHS``
maps names to classes, so more paths can be added beside these two.
"""

from __future__ import annotations

import logging
import math
import re
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch.func import grad, jvp, vmap

logger = logging.getLogger("hutch")

FORWARD_OVER_REVERSE = "forward-over-reverse"
REVERSE_OVER_REVERSE = "reverse-over-reverse"
AUTO = "auto"

# A function of the named parameters that returns the 0-dim loss of one data batch.
LossFunction = Callable[[dict[str, torch.Tensor]], torch.Tensor]
Tangents = dict[str, torch.Tensor]
# Products H T of one block of tangents, as per-parameter tensors with a leading block dimension.
BlockProduct = Callable[[Tangents], Tangents]


class HVPError(RuntimeError):
    """A Hessian-vector product could not be computed correctly."""


class UnsupportedOperationError(HVPError):
    """An operation in the model or loss supports neither HVP path."""


class NonFiniteHVPError(HVPError):
    """A Hessian-vector product contains NaN or Inf entries."""


class HVPMismatchError(HVPError):
    """The two HVP paths disagree on the same tangents."""


class HVPFallbackWarning(UserWarning):
    """Forward-over-reverse products failed, and reverse-over-reverse products are used instead."""


# --- the paths ----------------------------------------------------------------


class ForwardOverReverse:
    """Products ``jvp(grad(loss), (params,), (t,))``, vectorized over each block of tangents.

    ``vmap(randomness="same")`` gives every tangent of a block the same
    random draws (dropout masks) in the forward pass. Nothing is kept
    between blocks, so :meth:`prepare` is free and its result holds no
    memory beyond the parameters.
    """

    name = FORWARD_OVER_REVERSE
    # Whether the prepared products are worth keeping across matmat calls.
    keeps_state = False

    def prepare(self, loss: LossFunction, params: dict[str, torch.Tensor]) -> BlockProduct:
        """Return the function that maps a block of tangents T to ``H T``."""

        def product(tangent: Tangents) -> Tangents:
            return jvp(grad(loss), (params,), (tangent,))[1]

        return vmap(product, randomness="same")

    def products(
        self, loss: LossFunction, params: dict[str, torch.Tensor], blocks: Iterable[Tangents]
    ) -> Iterator[Tangents]:
        """Yield ``H T`` for each block T, as per-parameter tensors with a leading block dimension."""
        apply = self.prepare(loss, params)
        for tangents in blocks:
            yield apply(tangents)


class GradientGraph:
    """The gradient of one loss with its autograd graph, kept for repeated second backward passes.

    Calling it with a block of tangents T returns ``H T``, the
    vector-Jacobian products of the gradient, without rerunning the forward
    or the first backward pass. It holds the saved tensors of both passes
    (activations and the gradient) until it is dropped.
    """

    def __init__(self, path: "ReverseOverReverse", loss: LossFunction, params: dict[str, torch.Tensor]):
        self._path = path
        self.names = list(params)
        with torch.enable_grad():
            self._leaves = [params[name].detach().requires_grad_(True) for name in self.names]
            value = loss(dict(zip(self.names, self._leaves)))
            gradients = torch.autograd.grad(value, self._leaves, create_graph=True, allow_unused=True)

        # A gradient that is None or carries no graph contributes no second
        # derivative; only the others are differentiated again.
        self._connected = [i for i, g in enumerate(gradients) if g is not None and g.requires_grad]
        self._outputs = [gradients[i] for i in self._connected]
        path._warn_constant_gradients(self.names, gradients, self._connected)

    def __call__(self, tangents: Tangents) -> Tangents:
        names = self.names
        if not self._connected:
            return {name: torch.zeros_like(tangents[name]) for name in names}
        size = tangents[names[0]].shape[0]
        grad_outputs = [tangents[names[i]] for i in self._connected]
        rows = self._path._differentiate(self._outputs, self._leaves, grad_outputs, size)
        return dict(zip(names, rows))


class ReverseOverReverse:
    """Products ``d/dθ <∇L(θ), t>``: the vector-Jacobian product of the gradient.

    :meth:`prepare` builds the loss and its gradient graph once; the
    returned :class:`GradientGraph` serves any number of blocks of
    tangents. The operator decides how long a graph lives: for one matmat
    call, or while parameters, buffers, data and mode stay the same.

    Args:
        vectorize: Whether a block of tangents goes through one batched
            backward pass (``is_grads_batched=True``, which runs the
            backward under ``vmap``) instead of one backward pass per
            tangent. On the CPU the loop measured faster than the batched
            pass on every benchmark workload, so the operator vectorizes
            only on other devices.
    """

    name = REVERSE_OVER_REVERSE
    keeps_state = True

    def __init__(self, vectorize: bool = True):
        self.vectorize = vectorize
        # Cleared, for the path's lifetime, when a batched product fails and
        # the one-tangent loop succeeds.
        self.batched = True
        self._warned_constant = False

    def prepare(self, loss: LossFunction, params: dict[str, torch.Tensor]) -> GradientGraph:
        """Build the gradient graph of ``loss`` at ``params``; call the result with blocks of tangents."""
        return GradientGraph(self, loss, params)

    def products(
        self, loss: LossFunction, params: dict[str, torch.Tensor], blocks: Iterable[Tangents]
    ) -> Iterator[Tangents]:
        """Yield ``H T`` for each block T, as per-parameter tensors with a leading block dimension.

        The gradient graph is built once for all blocks and freed when the
        generator finishes.
        """
        graph = self.prepare(loss, params)
        for tangents in blocks:
            yield graph(tangents)

    def _differentiate(self, outputs, leaves, grad_outputs, size: int) -> list[torch.Tensor]:
        if self.vectorize and self.batched and size > 1:
            try:
                with torch.enable_grad():
                    return list(
                        torch.autograd.grad(
                            outputs, leaves, grad_outputs, retain_graph=True, allow_unused=True,
                            materialize_grads=True, is_grads_batched=True,
                        )
                    )
            except (RuntimeError, NotImplementedError) as error:
                rows = self._loop(outputs, leaves, grad_outputs, size)
                # The loop succeeded where the batched call failed, so the
                # failure is vmap's and the loop is used from now on.
                self.batched = False
                logger.info(
                    "reverse-over-reverse: batched products failed (%s: %s); using one tangent at a time",
                    type(error).__name__, first_line(error),
                )
                return rows
        return self._loop(outputs, leaves, grad_outputs, size)

    @staticmethod
    def _loop(outputs, leaves, grad_outputs, size: int) -> list[torch.Tensor]:
        with torch.enable_grad():
            if size == 1:
                column = torch.autograd.grad(
                    outputs, leaves, [t[0] for t in grad_outputs], retain_graph=True,
                    allow_unused=True, materialize_grads=True,
                )
                return [part[None] for part in column]
            columns = [
                torch.autograd.grad(
                    outputs, leaves, [t[j] for t in grad_outputs], retain_graph=True,
                    allow_unused=True, materialize_grads=True,
                )
                for j in range(size)
            ]
        return [torch.stack(parts) for parts in zip(*columns)]

    def _warn_constant_gradients(self, names, gradients, connected) -> None:
        constant = [names[i] for i, g in enumerate(gradients) if g is not None and i not in connected]
        if constant and not self._warned_constant:
            self._warned_constant = True
            warnings.warn(
                f"the gradient with respect to {constant} carries no autograd graph, so their "
                "Hessian rows are taken as zero. That is right when the loss is linear in them, "
                "and wrong when a custom torch.autograd.Function in the model computes its "
                "backward without autograd (for example under @once_differentiable); give such "
                "a Function a differentiable backward",
                HVPFallbackWarning,
                stacklevel=4,
            )


PATHS = {path.name: path for path in (ForwardOverReverse, ReverseOverReverse)}
HVP_PATHS = (AUTO, *PATHS)


# --- comparing the paths --------------------------------------------------------


@dataclass(frozen=True)
class PathComparison:
    """Products of the same tangents along both HVP paths, and how far apart they are.

    Attributes:
        max_abs_diff: Largest absolute difference between the two products,
            ``inf`` or ``nan`` when one of them has non-finite entries.
        scale: Largest absolute entry of either product, the scale the
            difference is judged against.
        rtol: Relative tolerance of the comparison.
        mismatched: Parameter names whose entries differ by more than
            ``rtol * scale``, or are NaN or Inf in either product.
        non_finite: For each path, the parameter names whose entries are
            NaN or Inf in its product.
        errors: For a path that could not run, its name and the error.
    """

    max_abs_diff: float
    scale: float
    rtol: float
    mismatched: list[str]
    non_finite: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """Summarize the comparison in one sentence."""
        if not self.complete:
            return f"not compared, because a path cannot run: {self.errors}"
        text = (
            f"largest difference {self.max_abs_diff:.3g} against a largest finite entry of "
            f"{self.scale:.3g} (rtol {self.rtol:.1e})"
        )
        for path, names in self.non_finite.items():
            if names:
                text += f"; {path} has NaN or Inf entries for {names}"
        return text

    @property
    def complete(self) -> bool:
        """Whether both paths ran, so the comparison means something."""
        return not self.errors

    @property
    def agree(self) -> bool:
        """Whether both paths ran and their products match within ``rtol``."""
        return self.complete and not self.mismatched


def compare_products(products: dict, layout, rtol: float, errors: dict[str, str]) -> PathComparison:
    """Compare the ``(k, P)`` product blocks of two paths; a path that failed has ``None``."""
    if any(block is None for block in products.values()):
        return PathComparison(math.nan, math.nan, rtol, [], {}, errors)

    def names_where(mask: torch.Tensor) -> list[str]:
        return [s.name for s in layout if bool(mask[:, s.offset : s.stop].any())]

    first, second = products.values()
    non_finite = {path: names_where(~block.isfinite()) for path, block in products.items()}
    difference = (first - second).abs()
    finite = torch.cat([first[first.isfinite()], second[second.isfinite()]]).abs()
    scale = float(finite.max()) if finite.numel() else 0.0

    # A NaN difference compares false, so non-finite entries never count as a match.
    tolerance = rtol * max(scale, torch.finfo(first.dtype).tiny)
    close = (difference <= tolerance) & first.isfinite() & second.isfinite()
    mismatched = names_where(~close)
    return PathComparison(float(difference.max()), scale, rtol, mismatched, non_finite, errors)


# --- naming the operation that failed -----------------------------------------

# Messages torch 2.13 raises when an operation lacks a derivative, with the
# group that names the operation.
_OPERATION_PATTERNS = (
    re.compile(r"forward AD with (\S+) that does not support it"),
    re.compile(r"in-place operation \((\S+)\) that would mutate a captured Tensor"),
    re.compile(r"derivative for '?(?:aten::)?([\w.]+)'? is not implemented"),
    re.compile(r"You tried to vmap over (\w+), but it does not have vmap support"),
)

_CUSTOM_FUNCTION_MESSAGES = (
    "must implement the jvp function for custom autograd.Function",
    "it must override the setup_context staticmethod",
)

# Other messages that torch 2.13 raises from inside function transforms or
# autograd, rather than from the model's own code.
_AUTODIFF_MESSAGES = ("ZeroTensors are immutable", "vmap", "functorch", "does not require grad")

_ANOMALY_NODE = re.compile(r"Error detected in (\w+)\.")

# Replacements that torch differentiates twice, keyed by a piece of the
# operation's name.
WORKAROUNDS = {
    "embedding_bag": (
        "replace nn.EmbeddingBag (F.embedding_bag) with nn.Embedding followed by a mean or "
        "sum over each bag, which has the same values and derivatives"
    ),
    "cdist": (
        'call torch.cdist(..., compute_mode="use_mm_for_euclid_dist"), whose matrix-product '
        "form torch differentiates twice"
    ),
    "euclidean_dist": (
        "this form of torch.cdist has no forward-mode derivative; use "
        "hvp='reverse-over-reverse' or hvp='auto'"
    ),
    "ctc_loss": (
        "torch has no second derivative of the CTC loss in any form; leave the CTC loss out "
        "of the Hessian or write the forward algorithm with torch.logsumexp"
    ),
    "attention": (
        "hutch runs every product under the math backend of scaled_dot_product_attention; "
        "a model that selects a fused backend itself (sdpa_kernel inside forward) must "
        "allow SDPBackend.MATH"
    ),
}


def is_autodiff_failure(error: BaseException) -> bool:
    """Whether ``error``'s message is one torch raises for a missing or unusable derivative."""
    message = str(error)
    return (
        any(pattern.search(message) for pattern in _OPERATION_PATTERNS)
        or any(text in message for text in _CUSTOM_FUNCTION_MESSAGES)
        or any(text in message for text in _AUTODIFF_MESSAGES)
    )


def first_line(error: BaseException) -> str:
    """Return the first line of an exception's message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _custom_function(error: BaseException) -> Optional[str]:
    """Return the name of the ``autograd.Function`` subclass being applied when ``error`` was raised."""
    found = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_name == "apply" and frame.f_code.co_filename.endswith(
            ("autograd/function.py", "autograd\\function.py")
        ):
            cls = frame.f_locals.get("cls")
            if isinstance(cls, type):
                found = cls.__qualname__
    return found


def name_operation(error: BaseException, diagnose: Optional[Callable[[], None]] = None) -> str:
    """Describe the operation that made a product fail, as precisely as the error allows.

    The name comes from the message where torch puts it there, then from
    the ``torch.autograd.Function`` on the traceback. A failure inside a
    backward formula, such as "ZeroTensors are immutable", names no
    operation, so ``diagnose`` (a callable that reruns the failing product)
    is run under ``torch.autograd.detect_anomaly``, whose report names the
    backward node and the forward call that created it.
    """
    message = str(error)
    custom = _custom_function(error)
    if custom is not None and (
        any(text in message for text in _CUSTOM_FUNCTION_MESSAGES) or "vmap over" in message
    ):
        return f"custom torch.autograd.Function {custom}"
    for pattern in _OPERATION_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1)
    if any(text in message for text in _CUSTOM_FUNCTION_MESSAGES):
        return "a custom torch.autograd.Function"
    if diagnose is not None:
        found = _diagnose_with_anomaly_mode(diagnose)
        if found is not None:
            return found
    return f"an operation that raised {type(error).__name__}: {first_line(error)}"


def _diagnose_with_anomaly_mode(diagnose: Callable[[], None]) -> Optional[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autograd.detect_anomaly(check_nan=False):
                diagnose()
        except Exception:  # noqa: BLE001 - the rerun is expected to fail; only its report is read
            pass
    for item in caught:
        text = str(item.message)
        match = _ANOMALY_NODE.search(text)
        if match:
            location = _forward_call_site(text)
            node = match.group(1)
            return f"{location} (backward node {node})" if location else f"backward node {node}"
    return None


def _forward_call_site(report: str) -> Optional[str]:
    """Return the innermost frame of an anomaly report's forward traceback outside torch's internals."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', report)
    for filename, line, function in reversed(frames):
        normalized = filename.replace("\\", "/")
        if "/torch/nn/functional.py" in normalized:
            return f"torch.nn.functional.{function}"
        internal = ("/torch/_functorch/", "/torch/autograd/", "/torch/utils/", "/torch/_", "/hutch/")
        if not any(part in normalized for part in internal):
            return f"{function} at {filename}:{line}"
    return None


def workaround(operation: str) -> Optional[str]:
    """Return a replacement that torch can differentiate twice, if one is known."""
    lowered = operation.lower()
    for key, text in WORKAROUNDS.items():
        if key in lowered:
            return text
    return None
