"""Every way of computing a 100-matvec Hutchinson trace that the benchmarks time.

A *method* is a function ``method(workload, num_matvecs, seed, chunk)`` that
starts from the model and the batch and returns the trace estimate. Its
timing therefore includes everything a user pays for one trace: building the
operator, the gradient graph or the linearization, drawing the probes and
the products. The families:

- ``gradients``: ``num_matvecs`` plain gradients, the unit of cost.
- ``raw:*``: candidate ways to evaluate Hessian-vector products, written
  here against ``torch.func`` and ``torch.autograd`` only, so they can be
  measured before the library adopts them.
- ``hutch:*``: :func:`hutch.hutchinson` on a :class:`hutch.HessianOperator`,
  once per HVP path the installed operator offers.
- ``peer:*``: PyHessian, curvlinops and hessian-eigenthings through their
  public trace functions.

:func:`product_builders` gives each raw path and each hutch path as a function from
a block of probes ``(k, P)`` to ``H`` times them, for the float64 agreement
check against double backward.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch.func import functional_call, grad, jvp, linearize, vmap

import hutch
from hutch._sampling import sample_probes
from workloads import Workload

# Candidate names for the operator's ``hvp=`` keyword, tried in this order
# when the installed hutch has such a keyword but exposes no list of them.
HVP_CANDIDATES = ("forward-over-reverse", "reverse-over-reverse", "auto")

# The path every other product is compared with.
REFERENCE_PATH = "raw:double-backward"


# --- shared pieces ----------------------------------------------------------


def functional_loss(workload: Workload):
    """Return the detached parameters as a dict and the loss as a function of such a dict."""
    model = workload.model
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p):
        outputs = functional_call(model, (p, buffers), (workload.inputs,))
        return workload.loss_fn(outputs, workload.targets)

    return params, loss


def probe_blocks(workload: Workload, num_matvecs: int, seed: int, chunk: int):
    """Yield Rademacher probes in blocks of at most ``chunk`` rows, shape ``(k, P)``."""
    generator = torch.Generator(device=workload.inputs.device).manual_seed(seed)
    num_params = workload.num_params
    dtype = next(workload.model.parameters()).dtype
    for start in range(0, num_matvecs, chunk):
        k = min(chunk, num_matvecs - start)
        yield sample_probes(num_params, k, "rademacher", generator, dtype, workload.inputs.device).T


def split_rows(workload: Workload, Z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a block ``(k, P)`` into per-parameter tensors of shape ``(k, *p.shape)``."""
    out, offset = {}, 0
    for name, p in workload.model.named_parameters():
        out[name] = Z[:, offset : offset + p.numel()].reshape(Z.shape[0], *p.shape)
        offset += p.numel()
    return out


def flatten_rows(products: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    return torch.cat([t.reshape(k, -1) for t in products.values()], dim=1)


def hutchinson_value(product_blocks: Callable, workload: Workload, num_matvecs: int, seed: int, chunk: int) -> float:
    """Average z^T H z over the probes, with ``product_blocks(Z)`` returning ``H Z`` row-wise."""
    total = 0.0
    for Z in probe_blocks(workload, num_matvecs, seed, chunk):
        total += float((Z * product_blocks(Z)).sum())
    return total / num_matvecs


# --- raw product paths: each returns a function Z (k, P) -> H Z (k, P) --------


def jvp_loop(workload: Workload):
    """Forward-over-reverse, one ``jvp(grad)`` call per probe."""
    params, loss = functional_loss(workload)
    gradient = grad(loss)

    def apply(Z):
        rows = []
        for z in Z:
            tangent = split_rows(workload, z[None])
            tangent = {name: t[0] for name, t in tangent.items()}
            rows.append(flatten_rows(jvp(gradient, (params,), (tangent,))[1], 1))
        return torch.cat(rows)

    return apply


def vmap_jvp(workload: Workload):
    """Forward-over-reverse, ``vmap`` of ``jvp(grad)`` over each block of probes."""
    params, loss = functional_loss(workload)
    gradient = grad(loss)
    batched = vmap(lambda tangent: jvp(gradient, (params,), (tangent,))[1])

    def apply(Z):
        return flatten_rows(batched(split_rows(workload, Z)), Z.shape[0])

    return apply


def linearize_replay(workload: Workload):
    """``torch.func.linearize`` of the gradient, traced once, replayed once per probe.

    The primal forward and backward run once, at linearization; each
    product replays only the traced tangent computation.
    """
    params, loss = functional_loss(workload)
    _, tangent_fn = linearize(grad(loss), params)

    def apply(Z):
        rows = []
        for z in Z:
            tangent = {name: t[0] for name, t in split_rows(workload, z[None]).items()}
            rows.append(flatten_rows(tangent_fn(tangent), 1))
        return torch.cat(rows)

    return apply


def _cached_gradient(workload: Workload):
    """Return the parameters and their gradient with its graph kept for a second backward."""
    params = [p for p in workload.model.parameters()]
    loss = workload.loss_fn(workload.model(workload.inputs), workload.targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return params, grads


def double_backward(workload: Workload):
    """Reverse-over-reverse through one cached gradient graph, one backward per probe."""
    params, grads = _cached_gradient(workload)

    def apply(Z):
        rows = []
        for z in Z:
            v = [t[0] for t in split_rows(workload, z[None]).values()]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            rows.append(torch.cat([h.reshape(1, -1) for h in hv], dim=1))
        return torch.cat(rows)

    return apply


def double_backward_batched(workload: Workload):
    """Reverse-over-reverse through one cached gradient graph, a block of probes per backward.

    ``is_grads_batched=True`` vectorizes the second backward over the
    leading dimension of ``grad_outputs`` with ``vmap``.
    """
    params, grads = _cached_gradient(workload)

    def apply(Z):
        V = list(split_rows(workload, Z).values())
        HV = torch.autograd.grad(grads, params, grad_outputs=V, retain_graph=True, is_grads_batched=True)
        return torch.cat([h.reshape(Z.shape[0], -1) for h in HV], dim=1)

    return apply


RAW_PATHS: dict[str, Callable] = {
    "raw:jvp-loop": jvp_loop,
    "raw:vmap-jvp": vmap_jvp,
    "raw:linearize": linearize_replay,
    "raw:double-backward": double_backward,
    "raw:double-backward-batched": double_backward_batched,
}

# Paths whose products are vectorized over a block; the others loop over its rows.
CHUNKED_PATHS = ("raw:vmap-jvp", "raw:double-backward-batched")


# --- hutch ------------------------------------------------------------------


def hutch_hvp_options() -> list[str]:
    """Return the values of ``HessianOperator``'s ``hvp`` keyword that the installed hutch accepts.

    An empty list means the operator has no ``hvp`` keyword; its one path
    is then benchmarked under the name it reports in ``hvp_path``.
    """
    signature = inspect.signature(hutch.HessianOperator)
    if "hvp" not in signature.parameters:
        return []
    for attribute in ("HVP_PATHS", "HVP_METHODS", "HVP_CHOICES"):
        options = getattr(hutch.operator, attribute, None)
        if isinstance(options, (tuple, list)) and options:
            return [str(option) for option in options]
    return list(HVP_CANDIDATES)


def hutch_operator(workload: Workload, hvp: str | None, chunk: int | None):
    kwargs = {"batch_size": chunk}
    if hvp is not None:
        kwargs["hvp"] = hvp
    return hutch.HessianOperator(workload.model, workload.loss_fn, (workload.inputs, workload.targets), **kwargs)


def hutch_trace(hvp: str | None):
    def method(workload: Workload, num_matvecs: int, seed: int, chunk: int | None):
        op = hutch_operator(workload, hvp, chunk)
        estimate = hutch.hutchinson(op, num_matvecs, seed=seed)
        return estimate.value, {"hvp_path": getattr(op, "hvp_path", None), "batch_size": op.batch_size}

    return method


# The memory knobs of hutch:low-memory: the data in this many micro-batches,
# and a memory budget of this many gradients' bytes.
LOW_MEMORY_MICRO_BATCHES = 4
LOW_MEMORY_BUDGET_GRADIENTS = 5


def hutch_low_memory(workload: Workload, num_matvecs: int, seed: int, chunk: int | None):
    """Run ``hvp="auto"`` with the data split into micro-batches and a budget of a few gradients.

    The budget stops the operator from keeping a gradient graph and from
    checking forward-over-reverse on a first column. The micro-batches bound
    the activations of each product. The Hessian is the same as with one
    batch, because every workload is in eval mode with a mean loss.
    """
    size = -(-workload.inputs.shape[0] // LOW_MEMORY_MICRO_BATCHES)
    data = list(zip(workload.inputs.split(size), workload.targets.split(size)))
    budget = LOW_MEMORY_BUDGET_GRADIENTS * workload.gradient_bytes
    op = hutch.HessianOperator(workload.model, workload.loss_fn, data, batch_size=chunk, memory_budget=budget)
    estimate = hutch.hutchinson(op, num_matvecs, seed=seed)
    settings = f"memory_budget={LOW_MEMORY_BUDGET_GRADIENTS} gradients, {len(data)} micro-batches of at most {size}"
    return estimate.value, {"hvp_path": op.hvp_path, "batch_size": op.batch_size, "settings": settings}


# --- peers ------------------------------------------------------------------


def pyhessian_trace(workload: Workload, num_matvecs: int, seed: int, chunk: int | None):
    from pyhessian import hessian

    model = workload.model
    torch.manual_seed(seed)
    saved = [p.grad for p in model.parameters()]
    try:
        computer = hessian(
            model, workload.loss_fn, data=(workload.inputs, workload.targets),
            cuda=workload.inputs.device.type == "cuda",
        )
        # A tolerance of -inf turns off the early stop, so exactly num_matvecs products run.
        terms = computer.trace(maxIter=num_matvecs, tol=float("-inf"))
    finally:
        # PyHessian leaves the gradient graph in .grad; restore what was there.
        for p, g in zip(model.parameters(), saved):
            p.grad = g
    return sum(terms) / len(terms), {"settings": "trace(maxIter=num_matvecs, tol=-inf)"}


def curvlinops_trace(workload: Workload, num_matvecs: int, seed: int, chunk: int | None):
    """curvlinops' ``hutchinson_trace``; with ``chunk`` set, that many probes per call, averaged."""
    from curvlinops import HessianLinearOperator, hutchinson_trace

    params = [p for p in workload.model.parameters() if p.requires_grad]
    A = HessianLinearOperator(
        workload.model, torch.nn.CrossEntropyLoss(), params,
        [(workload.inputs, workload.targets)], check_deterministic=False,
    )
    torch.manual_seed(seed)
    settings = "check_deterministic=False"
    if chunk is None:
        return float(hutchinson_trace(A, num_matvecs)), {"settings": settings}

    calls = [min(chunk, num_matvecs - start) for start in range(0, num_matvecs, chunk)]
    total = sum(k * float(hutchinson_trace(A, k)) for k in calls)
    return total / num_matvecs, {"settings": f"{settings}, {len(calls)} calls of {chunk} probes"}


def eigenthings_trace(workload: Workload, num_matvecs: int, seed: int, chunk: int | None):
    import hessian_eigenthings as he

    op = he.HessianOperator(
        workload.model, [(workload.inputs, workload.targets)], he.supervised_loss(workload.loss_fn)
    )
    result = he.trace(op, num_matvecs=num_matvecs, method="hutchinson", seed=seed)
    return result.estimate, {"settings": "trace(method='hutchinson')"}


PEERS = {
    "peer:pyhessian": ("pyhessian", pyhessian_trace),
    "peer:curvlinops": ("curvlinops", curvlinops_trace),
    "peer:hessian-eigenthings": ("hessian_eigenthings", eigenthings_trace),
}


def peer_version(module: str) -> str | None:
    from importlib import metadata

    distributions = {
        "pyhessian": "PyHessian",
        "curvlinops": "curvlinops-for-pytorch",
        "hessian_eigenthings": "hessian-eigenthings",
    }
    try:
        return metadata.version(distributions[module])
    except metadata.PackageNotFoundError:
        return None


# --- the method table -----------------------------------------------------


def gradients(workload: Workload, num_matvecs: int, seed: int, chunk: int | None):
    """Run ``num_matvecs`` forward and backward passes: the unit of cost."""
    params = list(workload.model.parameters())
    for _ in range(num_matvecs):
        loss = workload.loss_fn(workload.model(workload.inputs), workload.targets)
        torch.autograd.grad(loss, params)
    return float(loss), {}


def raw_trace(name: str):
    def method(workload: Workload, num_matvecs: int, seed: int, chunk: int | None):
        apply = RAW_PATHS[name](workload)
        # A block of k probes costs k * P * 12 bytes while it is drawn (int64
        # bits, then floats), so the per-probe loops draw one probe at a time.
        step = chunk if name in CHUNKED_PATHS else 1
        return hutchinson_value(apply, workload, num_matvecs, seed, step), {}

    return method


def method_table() -> dict[str, Callable]:
    """Every method name and its function; ``hutch:*`` entries follow the installed operator."""
    table = {"gradients": gradients}
    options = hutch_hvp_options()
    if options:
        for option in options:
            table[f"hutch:{option}"] = hutch_trace(option)
    else:
        table["hutch:default"] = hutch_trace(None)
    if "memory_budget" in inspect.signature(hutch.HessianOperator).parameters:
        table["hutch:low-memory"] = hutch_low_memory
    for name in RAW_PATHS:
        table[name] = raw_trace(name)
    for name, (_, method) in PEERS.items():
        table[name] = method
    return table


def product_builders(workload: Workload) -> dict[str, Callable]:
    """Every raw path and hutch path as a builder of a function from probes ``(k, P)`` to ``H Z``.

    Building is deferred so that a path which cannot run on a workload fails
    alone, when its builder is called.
    """
    table = {name: (lambda build=build: build(workload)) for name, build in RAW_PATHS.items()}
    for option in hutch_hvp_options() or [None]:

        def build(option=option):
            op = hutch_operator(workload, option, None)
            return lambda Z: op.matmat(Z.T).T

        table[f"hutch:{option or 'default'}"] = build
    return table
