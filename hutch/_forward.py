"""How the model's forward pass runs inside a Hessian-vector product.

Three things differ from a plain call of the model:

- Randomness (dropout) is drawn from torch's generators reseeded for each
  data batch from one forward seed, inside ``torch.random.fork_rng``, so
  every product of one estimate sees the same random draws and torch's
  global random state is the same after the call as before.
- Batch-norm layers in training mode normalize with the statistics of the
  batch, as in training, but their running statistics are left out of the
  call, so nothing is written to them.
- ``scaled_dot_product_attention`` runs on its math backend, because the
  fused CPU and GPU kernels have neither a forward-mode derivative nor a
  twice-differentiable backward in torch 2.13.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norm_overrides(model: nn.Module) -> dict[str, None]:
    """Map the running-statistics buffers of normalization layers in training mode to ``None``.

    Passed to ``functional_call``, the overrides make ``BatchNorm`` and
    ``InstanceNorm`` layers with ``track_running_stats=True`` in training
    mode normalize with batch statistics without updating (or reading)
    their running statistics. Layers in eval mode are not listed and use
    their running statistics.
    """
    overrides = {}
    for prefix, module in model.named_modules():
        if not (
            isinstance(module, nn.modules.batchnorm._NormBase)
            and module.training
            and module.track_running_stats
        ):
            continue
        for buffer in _RUNNING_STATISTICS:
            if getattr(module, buffer, None) is not None:
                overrides[f"{prefix}.{buffer}" if prefix else buffer] = None
    return overrides


def batch_seed(forward_seed: int, batch_index: int) -> int:
    """Return the seed of data batch ``batch_index``'s forward pass, a 63-bit int."""
    words = np.random.SeedSequence([forward_seed, batch_index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_from_generator(generator: torch.Generator) -> int:
    """Derive a 63-bit seed from a generator's state without drawing from it."""
    state = generator.get_state().cpu().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def frozen_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the CPU generator and ``device``'s generator with ``seed``, and restore both on exit."""
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda"
    ) else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def math_attention():
    """Return a context in which ``scaled_dot_product_attention`` uses its math backend."""
    return sdpa_kernel(SDPBackend.MATH)
