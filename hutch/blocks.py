"""Traces of the diagonal blocks of an operator, one per parameter or module, from shared probes.

The trace of a diagonal block :math:`A_{BB}` is the sum of the diagonal
entries in B, so every diagonal estimator in :mod:`hutch.diagonal` gives
block traces by summing its per-sample diagonal vectors over each block.
One set of probes serves every block, and the block estimates add up to
the whole-operator estimate from the same probes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator, Optional, Union

import torch

from hutch.diagonal import DiagonalSamples, diagonal_samples
from hutch.exact import exact_diagonal
from hutch.hutchinson import _std_error
from hutch.linop import OperatorLike, as_linear_operator
from hutch.result import TraceEstimate

BLOCK_KINDS = ("parameter", "module")

BlockSpec = Union[str, Callable[[str], str], Mapping[str, object]]


class BlockTraces(Mapping):
    """Trace estimates of diagonal blocks, in flat order, plus their sum.

    A read-only mapping from block name to :class:`hutch.TraceEstimate`.
    Every block estimate comes from the same probes, so each reports the
    shared ``num_matvecs``. The block estimates are correlated with each
    other, so the standard error of their sum is the one in :attr:`total`,
    not a combination of the block standard errors.

    Attributes:
        total: The whole-operator estimate from the same probes; its value
            is the sum of the block values.
        members: Block name to the parameter names it contains, or to
            ``None`` for blocks given as flat index ranges.
    """

    def __init__(
        self,
        estimates: dict[str, TraceEstimate],
        total: TraceEstimate,
        members: dict[str, Optional[list[str]]],
    ):
        self._estimates = dict(estimates)
        self.total = total
        self.members = dict(members)

    def __getitem__(self, name: str) -> TraceEstimate:
        return self._estimates[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._estimates)

    def __len__(self) -> int:
        return len(self._estimates)

    def values_dict(self) -> dict[str, float]:
        """Return block name to estimated trace, as plain floats."""
        return {name: est.value for name, est in self._estimates.items()}

    def __repr__(self) -> str:
        rows = ", ".join(f"{name!r}: {est.value:.6g}" for name, est in self._estimates.items())
        return f"BlockTraces({{{rows}}}, total={self.total.value:.6g})"


def block_traces(
    A: OperatorLike,
    num_matvecs: int,
    *,
    blocks: BlockSpec = "parameter",
    method: str = "hutchinson",
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> BlockTraces:
    r"""Estimate the trace of each diagonal block of ``A`` from one set of probes.

    For a block B of coordinates (the entries of one parameter, or of all
    parameters of one module), :math:`\mathrm{tr}(A_{BB}) = \sum_{j \in B} A_{jj}`.
    Each method writes its estimate of :math:`\mathrm{diag}(A)` as an exact
    part plus the mean of per-sample diagonal vectors :math:`d_i` (see
    :func:`hutch.diagonal`); the block estimate sums both over B:

    .. math::
        \widehat{\mathrm{tr}}(A_{BB}) = \sum_{j \in B} e_j
            + \frac{1}{m} \sum_{i=1}^m \sum_{j \in B} (d_i)_j ,

    with standard error the sample standard deviation of the block sums of
    the :math:`d_i` over :math:`\sqrt{m}`. The whole-operator estimate in
    :attr:`BlockTraces.total` sums over every coordinate, so the block
    values add up to it exactly.

    - ``"hutchinson"``: :math:`d_i = z_i \odot A z_i`, so the block term is
      :math:`z_{i,B}^\top (A z_i)_B`. ``total`` equals
      :func:`hutch.hutchinson` with the same seed and ``batch_size``.
    - ``"hutchpp"``: Hutch++ deflation that is valid per block. The usual
      two-sided split :math:`\mathrm{tr}(A) = \mathrm{tr}(Q^\top A Q) +
      \mathrm{tr}((I - QQ^\top) A (I - QQ^\top))` holds for the whole
      trace only, because the cross terms :math:`QQ^\top A (I - QQ^\top)`
      have zero trace but nonzero diagonal blocks. This method deflates
      one-sidedly instead, :math:`\mathrm{diag}(A) = \mathrm{diag}(QQ^\top A)
      + \mathrm{diag}((I - QQ^\top) A)` (Diag++), an identity that holds
      for every entry and so for every block: the first part is exact from
      Q and :math:`A^\top Q`, the second is estimated with Hutchinson. Q
      comes from one sketch of the whole operator, a third of the budget.
      ``total`` is therefore a one-sided Hutch++ estimate, unbiased like
      :func:`hutch.hutchpp` but not equal to it.
    - ``"xdiag"``: the exchangeable XDiag vectors; standard errors are the
      leave-one-out heuristic of :func:`hutch.xtrace`.

    Probes are shared, so a block's terms include products with entries
    outside the block (:math:`A_{B,B^c} z_{B^c}`): a block estimate has the
    variance of a Hutchinson estimate of the block's share of the whole
    operator, not of :math:`A_{BB}` alone.

    When ``num_matvecs`` is at least n, the exact diagonal is summed
    instead, with standard errors 0.

    Args:
        A: A square tensor or operator; a :class:`hutch.HessianOperator`
            for blocks named by parameter or module.
        num_matvecs: Products to spend, as for :func:`hutch.diagonal`.
        blocks: How to group coordinates, for an operator with a ``layout``
            (a :class:`hutch.ParameterLayout`):

            - ``"parameter"`` (default): one block per parameter.
            - ``"module"``: one block per module, holding all its direct
              parameters: ``layer1.0.conv1.weight`` and
              ``layer1.0.conv1.bias`` form block ``layer1.0.conv1``, and
              parameters of the root module form block ``""``.
            - a callable from parameter name to block name, for other
              groupings, such as ``lambda name: name.split(".")[0]``.
            - a mapping from block name to a list of parameter names.

            For any operator, a mapping from block name to a ``slice`` of
            flat indices or a 1-D integer tensor of indices. Every
            coordinate must belong to exactly one block.
        method: ``"hutchinson"`` (default), ``"hutchpp"`` or ``"xdiag"``.
        distribution, generator, seed, batch_size: As for
            :func:`hutch.diagonal`.

    Returns:
        A :class:`hutch.BlockTraces`, ordered by each block's first
        coordinate.

    Raises:
        ValueError: If ``blocks`` names an unknown parameter, leaves a
            coordinate out or puts one in two blocks, or requests parameter
            grouping on an operator without a layout, and as
            :func:`hutch.diagonal` raises.
        TypeError: If ``blocks`` is of an unsupported type.

    Example:
        >>> import torch, hutch
        >>> A = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
        >>> parts = hutch.block_traces(A, 3, blocks={"a": slice(0, 2), "b": slice(2, 6)}, seed=0)
        >>> parts["a"].value, parts["b"].value, parts.total.value
        (3.0, 18.0, 21.0)
    """
    # Blocks are checked before any product is spent.
    A = as_linear_operator(A)
    names, index, members = resolve_blocks(A, blocks)
    A, samples, seed = diagonal_samples(A, num_matvecs, method, distribution, generator, seed, batch_size)

    if samples is None:
        return _exact_block_traces(A, names, index, members, method, batch_size)
    return _estimated_block_traces(A, samples, names, index, members, method, seed)


def _estimated_block_traces(
    A, samples: DiagonalSamples, names, index, members, method: str, seed
) -> BlockTraces:
    num_blocks = len(names)
    index = index.to(A.device)

    # Exact part and per-sample vectors, each summed over every block.
    exact = torch.zeros(num_blocks, dtype=torch.float64, device=A.device)
    exact.index_add_(0, index, samples.exact_part.double())
    block_terms = []
    for batch in samples.batches:
        sums = torch.zeros(num_blocks, batch.shape[1], dtype=torch.float64, device=A.device)
        block_terms.append(sums.index_add_(0, index, batch.double()))
    terms = torch.cat(block_terms, dim=1).cpu()
    exact = exact.cpu()

    common = dict(num_matvecs=samples.num_matvecs, method=method, num_samples=terms.shape[1], seed=seed)
    estimates = {
        name: TraceEstimate(
            value=float(exact[b] + terms[b].mean()),
            std_error=_std_error(terms[b]),
            info={**samples.info, "block": name, "numel": int((index == b).sum())},
            **common,
        )
        for b, name in enumerate(names)
    }
    total_terms = terms.sum(dim=0)
    total = TraceEstimate(
        value=float(exact.sum() + total_terms.mean()),
        std_error=_std_error(total_terms),
        info=dict(samples.info),
        **common,
    )
    return BlockTraces(estimates, total, members)


def _exact_block_traces(A, names, index, members, method: str, batch_size) -> BlockTraces:
    n = A.shape[0]
    sums = torch.zeros(len(names), dtype=torch.float64, device=A.device)
    sums.index_add_(0, index.to(A.device), exact_diagonal(A, batch_size=batch_size).double())
    sums = sums.cpu()

    def exact(value: float, info: dict) -> TraceEstimate:
        return TraceEstimate(
            value=value, std_error=0.0, num_matvecs=n, method=method, num_samples=n,
            exact=True, info=info,
        )

    estimates = {
        name: exact(float(sums[b]), {"block": name, "numel": int((index == b).sum())})
        for b, name in enumerate(names)
    }
    return BlockTraces(estimates, exact(float(sums.sum()), {}), members)


def resolve_blocks(A, blocks: BlockSpec):
    """Return block names in flat order, a block id per coordinate and each block's parameters.

    Returns:
        ``(names, index, members)``: ``index`` is a ``(n,)`` integer tensor
        on the CPU with ``index[j]`` the position in ``names`` of the block
        holding coordinate j.
    """
    n = A.shape[0]
    layout = getattr(A, "layout", None)

    if isinstance(blocks, str) or callable(blocks):
        group = _parameter_grouping(blocks)
        if layout is None:
            raise ValueError(
                f"blocks={blocks!r} groups by parameter name, which needs an operator with a "
                f"parameter layout such as hutch.HessianOperator; got {type(A).__name__}. Pass "
                "blocks as a mapping from block name to a slice of flat indices instead"
            )
        groups: dict[str, list[str]] = {}
        for name in layout.names:
            key = group(name)
            if not isinstance(key, str):
                raise TypeError(
                    f"the blocks callable must return a block name (str); it returned "
                    f"{type(key).__name__} {key!r} for parameter {name!r}"
                )
            groups.setdefault(key, []).append(name)
        return _blocks_from_parameters(layout, groups, n)

    if isinstance(blocks, Mapping):
        if not blocks:
            raise ValueError("blocks is an empty mapping; give at least one block")
        values = list(blocks.values())
        if all(isinstance(v, (list, tuple)) for v in values):
            if layout is None:
                raise ValueError(
                    "blocks maps names to parameter names, which needs an operator with a "
                    f"parameter layout such as hutch.HessianOperator; got {type(A).__name__}. "
                    "Map block names to slices of flat indices instead"
                )
            return _blocks_from_parameters(layout, {k: list(v) for k, v in blocks.items()}, n)
        return _blocks_from_indices(blocks, n)

    raise TypeError(
        f"blocks must be 'parameter', 'module', a callable from parameter name to block name, "
        f"or a mapping from block name to parameter names or flat indices; got "
        f"{type(blocks).__name__}"
    )


def _parameter_grouping(blocks) -> Callable[[str], str]:
    if callable(blocks):
        return blocks
    if blocks == "parameter":
        return lambda name: name
    if blocks == "module":
        return lambda name: name.rpartition(".")[0]
    raise ValueError(
        f"blocks must be one of {list(BLOCK_KINDS)}, a callable or a mapping; got {blocks!r}"
    )


def _blocks_from_parameters(layout, groups: dict[str, list[str]], n: int):
    owner: dict[str, str] = {}
    for block, params in groups.items():
        for name in params:
            if name not in layout:
                raise ValueError(
                    f"block {block!r} names parameter {name!r}, which is not in the operator's "
                    f"layout; known parameters are {layout.names}"
                )
            if name in owner:
                raise ValueError(
                    f"parameter {name!r} is in two blocks, {owner[name]!r} and {block!r}; "
                    "put each parameter in exactly one block"
                )
            owner[name] = block
    missing = [name for name in layout.names if name not in owner]
    if missing:
        raise ValueError(
            f"parameters {missing} are in no block; put every parameter in a block, or build "
            "the operator with params=[...] to leave them out (a diagonal block of the "
            "Hessian does not depend on which other parameters are included)"
        )

    index = torch.empty(n, dtype=torch.long)
    names: list[str] = []
    members: dict[str, list[str]] = {}
    for slot in layout:
        block = owner[slot.name]
        if block not in members:
            names.append(block)
            members[block] = []
        members[block].append(slot.name)
        index[slot.offset : slot.stop] = names.index(block)
    return names, index, members


def _blocks_from_indices(blocks: Mapping[str, object], n: int):
    index = torch.full((n,), -1, dtype=torch.long)
    for b, (block, where) in enumerate(blocks.items()):
        positions = _flat_positions(block, where, n)
        taken = index[positions] >= 0
        if bool(taken.any()):
            j = int(positions[taken][0])
            other = list(blocks)[int(index[j])]
            raise ValueError(
                f"flat index {j} is in two blocks, {other!r} and {block!r}; put each index in "
                "exactly one block"
            )
        index[positions] = b
    missing = (index < 0).nonzero().flatten()
    if missing.numel():
        raise ValueError(
            f"{missing.numel()} flat indices are in no block (the first is {int(missing[0])}); "
            f"the blocks must cover all {n} indices"
        )

    # Order blocks by their first coordinate, as parameter blocks are.
    first = {block: int((index == b).nonzero()[0]) for b, block in enumerate(blocks)}
    names = sorted(blocks, key=first.__getitem__)
    remap = torch.tensor([names.index(block) for block in blocks], dtype=torch.long)
    return names, remap[index], {name: None for name in names}


def _flat_positions(block: str, where: object, n: int) -> torch.Tensor:
    if isinstance(where, slice):
        positions = torch.arange(n)[where]
    elif isinstance(where, range):
        positions = torch.tensor(list(where), dtype=torch.long)
    elif isinstance(where, torch.Tensor) and where.ndim == 1 and not where.dtype.is_floating_point:
        positions = where.to(torch.long).cpu()
    else:
        raise TypeError(
            f"block {block!r} must map to a slice, a range or a 1-D integer tensor of flat "
            f"indices, or to a list of parameter names; got {type(where).__name__}"
        )
    if positions.numel() == 0:
        raise ValueError(f"block {block!r} is empty; give it at least one flat index")
    if bool(((positions < 0) | (positions >= n)).any()):
        raise ValueError(
            f"block {block!r} has flat indices outside [0, {n}); the operator has {n} rows"
        )
    if positions.unique().numel() != positions.numel():
        raise ValueError(f"block {block!r} lists a flat index more than once")
    return positions
