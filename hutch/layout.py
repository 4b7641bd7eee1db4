"""Mapping between flat parameter vectors and named parameter tensors.

A Hessian operator acts on flat vectors of length P, the total number of
parameter entries. The flat order is the order of ``model.named_parameters()``
with each parameter flattened row-major, so entry ``offset + j`` of a flat
vector belongs to element ``j`` of ``param.reshape(-1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch


@dataclass(frozen=True)
class ParameterSlot:
    """Position of one parameter inside a flat vector.

    Attributes:
        name: The parameter's name, as in ``model.named_parameters()``.
        shape: The parameter's shape.
        offset: Index of the parameter's first entry in the flat vector.
        numel: Number of entries, the product of ``shape``.
    """

    name: str
    shape: torch.Size
    offset: int
    numel: int

    @property
    def stop(self) -> int:
        """Index one past the parameter's last entry in the flat vector."""
        return self.offset + self.numel


class ParameterLayout:
    """Ordered layout of named parameters inside flat vectors of length P.

    Args:
        named_shapes: ``(name, shape)`` pairs in flat order, with unique names.

    Raises:
        ValueError: If a name appears more than once.
    """

    def __init__(self, named_shapes: Sequence[tuple[str, Sequence[int]]]):
        slots = []
        offset = 0
        for name, shape in named_shapes:
            if any(slot.name == name for slot in slots):
                raise ValueError(
                    f"parameter name {name!r} appears more than once in named_shapes; "
                    "each name must be unique"
                )
            shape = torch.Size(shape)
            numel = shape.numel()
            slots.append(ParameterSlot(name, shape, offset, numel))
            offset += numel
        self._slots = {slot.name: slot for slot in slots}
        self.num_params = offset

    def __iter__(self) -> Iterator[ParameterSlot]:
        return iter(self._slots.values())

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __repr__(self) -> str:
        rows = ", ".join(f"{s.name}: {tuple(s.shape)} @ {s.offset}" for s in self)
        return f"ParameterLayout(num_params={self.num_params}, [{rows}])"

    @property
    def names(self) -> list[str]:
        """Parameter names in flat order."""
        return list(self._slots)

    def slot(self, name: str) -> ParameterSlot:
        """Return the slot of parameter ``name``.

        Raises:
            KeyError: If ``name`` is not part of the layout.
        """
        try:
            return self._slots[name]
        except KeyError:
            raise KeyError(
                f"parameter name {name!r} is not in this layout; "
                f"known names are {self.names}"
            ) from None

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split flat vectors into per-parameter tensors (views, no copy).

        Args:
            flat: Shape ``(P,)`` or ``(k, P)``.

        Returns:
            A dict from name to a tensor shaped like the parameter, with a
            leading ``k`` dimension when ``flat`` is 2-D.
        """
        self._check_flat(flat, "flat")
        lead = flat.shape[:-1]
        return {
            s.name: flat[..., s.offset : s.stop].reshape(lead + s.shape)
            for s in self
        }

    def flatten(self, tensors: Mapping[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate per-parameter tensors into flat vectors.

        Args:
            tensors: A dict with one tensor per parameter of the layout, each
                shaped ``batch_shape + param.shape``.
            batch_dims: Number of leading batch dimensions (0 or 1).

        Returns:
            Shape ``batch_shape + (P,)``.
        """
        missing = [n for n in self._slots if n not in tensors]
        if missing:
            raise KeyError(f"tensors is missing parameters {missing}")
        pieces = []
        for s in self:
            t = tensors[s.name]
            batch_shape = t.shape[:batch_dims]
            if t.shape[batch_dims:] != s.shape:
                raise ValueError(
                    f"tensor for parameter {s.name!r} has shape {tuple(t.shape)}; "
                    f"expected {tuple(batch_shape) + tuple(s.shape)}"
                )
            pieces.append(t.reshape(*batch_shape, s.numel))
        return torch.cat(pieces, dim=-1)

    def block(self, matrix: torch.Tensor, row: str, col: str) -> torch.Tensor:
        """Extract the block of a (P, P) matrix for a pair of parameters.

        The result has shape ``shape(row) + shape(col)``, the layout
        ``torch.func.hessian`` uses for the same pair, so
        ``block(H, a, b)[i..., j...]`` is the second derivative with respect
        to ``a[i...]`` and ``b[j...]``.
        """
        if matrix.shape != (self.num_params, self.num_params):
            raise ValueError(
                f"matrix has shape {tuple(matrix.shape)}; expected "
                f"({self.num_params}, {self.num_params}) for this layout"
            )
        r, c = self.slot(row), self.slot(col)
        return matrix[r.offset : r.stop, c.offset : c.stop].reshape(r.shape + c.shape)

    def to_nested(self, matrix: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Rearrange a (P, P) matrix into ``torch.func.hessian``'s nested blocks.

        Returns:
            ``nested[a][b] == block(matrix, a, b)`` for every pair of names.
        """
        return {a: {b: self.block(matrix, a, b) for b in self.names} for a in self.names}

    def from_nested(self, nested: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Assemble nested blocks, as ``torch.func.hessian`` returns them, into a (P, P) matrix."""
        rows = []
        for a in self:
            row = []
            for b in self:
                block = nested[a.name][b.name]
                if block.shape != a.shape + b.shape:
                    raise ValueError(
                        f"block ({a.name!r}, {b.name!r}) has shape {tuple(block.shape)}; "
                        f"expected {tuple(a.shape + b.shape)}"
                    )
                row.append(block.reshape(a.numel, b.numel))
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0)

    def _check_flat(self, flat: torch.Tensor, arg: str) -> None:
        if not isinstance(flat, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor; got {type(flat).__name__}")
        if flat.ndim not in (1, 2) or flat.shape[-1] != self.num_params:
            raise ValueError(
                f"{arg} has shape {tuple(flat.shape)}; expected ({self.num_params},) "
                f"or (k, {self.num_params}) for a layout of {self.num_params} parameters"
            )
