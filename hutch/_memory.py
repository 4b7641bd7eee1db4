"""The default number of probes per vectorized Hessian-vector product chunk."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

# Memory allowed for one vectorized chunk on the CPU.
CPU_CHUNK_BYTES = 2**30
# Fraction of the free GPU memory allowed for one chunk.
GPU_CHUNK_FRACTION = 0.25
# A forward-over-reverse product keeps tangents of the parameters, of the
# activations, of the saved tensors of the backward pass and of the gradient;
# this factor over (parameters + activations) bounds that with some margin.
# NOTE: reverse-over-reverse products are sized with the same factor; their
# batched double backward also keeps per-probe tangents of the activations,
# but the factor has not been measured for that path.
BYTES_FACTOR = 6
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


def default_probe_chunk(op, batch) -> int:
    """Choose how many probes one vectorized product handles at once."""
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    activations = activation_numel(op.model, op._current_params(), op._fixed_tensors(), batch.inputs)
    per_probe = BYTES_FACTOR * itemsize * (op.num_params + activations)

    if op.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(op.device)
        budget = GPU_CHUNK_FRACTION * free
    else:
        budget = CPU_CHUNK_BYTES
    return int(max(1, min(MAX_CHUNK, budget // per_probe)))
