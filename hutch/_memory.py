"""The memory a Hessian operator may use: probes per chunk, and whether a gradient graph is kept.

One budget, in bytes, governs both. Without one, the budget is
``CPU_BUDGET_BYTES`` on the CPU and a quarter of the free memory on a GPU.
Sizes are estimated from the parameter count P and the number of
activation entries A of one forward pass (every leaf module's output):

- a vectorized chunk of c probes takes about ``BYTES_FACTOR * c * (P + A)``
  entries;
- a kept gradient graph takes about ``GRAPH_FACTOR * (P + A)`` entries: the
  saved activations of the forward and first backward pass, and the
  gradient itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

# Memory allowed on the CPU when the caller sets no budget.
CPU_BUDGET_BYTES = 2**30
# Fraction of the free GPU memory allowed when the caller sets no budget.
GPU_BUDGET_FRACTION = 0.25
# A forward-over-reverse product keeps tangents of the parameters, of the
# activations, of the saved tensors of the backward pass and of the gradient;
# this factor over (parameters + activations) bounds that with some margin.
# NOTE: reverse-over-reverse chunks are sized with the same factor. On the
# CPU they differentiate one probe at a time and need less; the factor has
# not been measured for their batched double backward on other devices.
BYTES_FACTOR = 6
# A gradient graph keeps the activations saved by the forward pass, those
# saved by the backward pass for differentiating it again, and the gradient.
# NOTE: an estimate from counting, not a measurement of every model.
GRAPH_FACTOR = 3
MAX_CHUNK = 256


def activation_numel(model: nn.Module, params, fixed, inputs: torch.Tensor) -> int:
    """Count the output entries of every leaf module in one forward pass.

    The pass runs without gradients on cloned buffers, with torch's random
    state restored afterwards, so the model's state is unchanged.
    """
    total = 0

    def count(module, args, output):
        nonlocal total
        stack = [output]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                total += item.numel()
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    cloned = {name: t.clone() for name, t in fixed.items()}
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            functional_call(model, (params, cloned), (inputs,))
    finally:
        for handle in handles:
            handle.remove()
    return total


def memory_budget(device: torch.device, requested: Optional[int]) -> int:
    """Return the bytes the operator may use: ``requested``, or the device's default."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(GPU_BUDGET_FRACTION * free)
    return CPU_BUDGET_BYTES


def plan_memory(op, batch, budget: int) -> tuple[int, bool, bool]:
    """Return the probes per vectorized chunk, whether a gradient graph fits beside one chunk, and whether one probe fits.

    A chunk gets what the budget leaves after the graph when the graph
    fits, and the whole budget otherwise; it is at least 1 probe, so a
    budget below one probe's needs still runs, one probe at a time. The
    third value tells whether a single forward-over-reverse product fits
    the budget at all.
    """
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    activations = activation_numel(op.model, op._current_params(), op._fixed_tensors(), batch.inputs)
    per_probe = BYTES_FACTOR * itemsize * (op.num_params + activations)
    graph = GRAPH_FACTOR * itemsize * (op.num_params + activations)

    keep_graph = graph + per_probe <= budget
    room = budget - graph if keep_graph else budget
    chunk = int(max(1, min(MAX_CHUNK, room // per_probe)))
    return chunk, keep_graph, per_probe <= budget
