"""Reading ``(inputs, targets)`` batches for a Hessian operator."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch


class Batch(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor
    num_samples: int


def _is_single_batch(data) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
    )


def count_samples(inputs: torch.Tensor, targets: torch.Tensor, index: int) -> int:
    """Return the number of samples of a batch, checking inputs and targets agree."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"batch {index}: inputs and targets must be tensors; got "
            f"({type(inputs).__name__}, {type(targets).__name__})"
        )
    if inputs.ndim == 0:
        raise ValueError(
            f"batch {index}: inputs must have a leading sample dimension; got a 0-dim tensor. "
            "Use inputs[None] for a single sample"
        )
    if targets.ndim > 0 and targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"batch {index}: inputs have {inputs.shape[0]} samples (shape {tuple(inputs.shape)}) "
            f"but targets have {targets.shape[0]} (shape {tuple(targets.shape)}); both need "
            "the same leading dimension"
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"batch {index} is empty (inputs of shape {tuple(inputs.shape)})")
    return int(inputs.shape[0])


class BatchSource:
    """Batches of a data argument, re-readable for every product.

    A single batch or a sequence is kept as it is, a re-iterable object (a
    ``DataLoader``) is iterated anew on every pass, and a one-shot iterator is
    read once into a list.
    """

    def __init__(self, data):
        if _is_single_batch(data):
            self._source = [tuple(data)]
        elif isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
            raise TypeError(
                "data must be an (inputs, targets) pair of tensors or an iterable of such "
                f"pairs; got {type(data).__name__}"
            )
        elif isinstance(data, Iterator):
            self._source = list(data)
        else:
            self._source = data
        if isinstance(self._source, (list, tuple)) and len(self._source) == 0:
            raise ValueError("data is empty; pass at least one (inputs, targets) batch")

    def batches(self, device: torch.device) -> Iterator[Batch]:
        """Yield copies of the batches on ``device``, detached, with their sample counts."""
        for index, batch in enumerate(self._source):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(
                    f"batch {index} must be an (inputs, targets) pair; got "
                    f"{type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                )
            inputs, targets = batch
            num_samples = count_samples(inputs, targets, index)
            # Copies, so that in-place operations in the model or the loss
            # never write into the caller's tensors.
            yield Batch(
                inputs.detach().to(device, copy=True),
                targets.detach().to(device, copy=True),
                num_samples,
            )


def normalize_data(data) -> BatchSource:
    return BatchSource(data)
