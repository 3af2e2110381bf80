"""Data-free criteria: group weight norms and random (baselines, design §5.4).

Magnitude scores are lazy (:class:`LazyScores`: computed from the weights on access,
never held) and say whether they are finite without being materialised
(:meth:`LazyScores.finite`). The ``"l2"`` channel score is the aggregation of
:mod:`.aggregate` (signed sums of the squared weights over every member slice, then a
square root) computed once per (tensor, dim) instead of once per member
(:func:`_l2_aggregate`).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from . import ScoringContext, criterion
from .aggregate import root_of_sum


def _params(ctx: ScoringContext):
    return {name: p.detach() for name, p in ctx.module.named_parameters()}


class LazyScores(Mapping):
    """Per-parameter scores ``fn(p)`` computed on each access from the weights: a
    magnitude score is a cheap function of them, and holding it would be a second copy
    of every weight (1.8 B parameters: 7 GiB). Reads the weights as they are at access
    time (``compile``'s dense graph reads the model's own tensors)."""

    lazy = True

    def __init__(self, params: Dict[str, torch.Tensor], fn: Callable,
                 finite: Optional[Callable[[torch.Tensor], bool]] = None):
        self._params, self._fn, self._finite = params, fn, finite

    def finite(self, name: str) -> bool:
        """Whether every entry of the score of ``name`` is finite, from the weight itself
        when the criterion gives a rule (no score tensor is made), else from the score."""
        p = self._params[name]
        if not p.is_floating_point() or p.numel() == 0:
            return True
        if self._finite is not None:
            return self._finite(p)
        return all_finite(self._fn(p))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fn(self._params[name])

    def __contains__(self, name) -> bool:  # Mapping's would compute the score to find out
        return name in self._params

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


@criterion("l1", "L1 norm of every member slice of a channel (data-free)", needs_data=False,
           options=())
def _l1(ctx: ScoringContext) -> Mapping:
    return LazyScores(_params(ctx), torch.abs, finite=all_finite)


def all_finite(t: torch.Tensor) -> bool:
    """Every entry of ``t`` is finite. A NaN or an infinity among the entries makes their
    sum non-finite, so a finite sum (one reduction, no temporary) proves it; only a sum
    that is not finite (it may have overflowed) is checked entry by entry."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _squares_finite(p: torch.Tensor) -> bool:
    """``p.pow(2)`` is finite: squaring is monotone in ``|p|``, so it is exactly when the
    largest magnitude squares to a finite number (NaN and inf propagate through
    ``aminmax``)."""
    lo, hi = torch.aminmax(p.detach())
    top = torch.maximum(-lo, hi)
    return bool(torch.isfinite(top * top))


def _l2_aggregate(groups, scores, ctx):
    """The group's weight norm over all member slices: sqrt of the summed squares
    (:func:`.aggregate.channel_scores` with :func:`root_of_sum`). Each tensor is squared
    once, and each (tensor, dim) it is sliced along summed once, however many members
    and groups read it."""
    groups = list(groups)
    along = _square_sums(groups, scores)
    out = {}
    for g in groups:
        total = None
        for m in g.members:
            if (m.target, m.dim) not in along:
                continue
            part = _per_channel(m.index_map, along[m.target, m.dim], g.size)
            total = part if total is None else total + part.to(total.dtype)
        out[g.id] = root_of_sum(total if total is not None
                                else torch.zeros(g.size, dtype=torch.float64))
    return out


def weight_norms(groups, module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """:func:`.aggregate.weight_norms` (every channel's float64 L2 norm over the member
    slices that are parameters of ``module``: selection's tie-break key) computed as
    :func:`_l2_aggregate` computes it: each tensor squared once, one at a time."""
    squares = LazyScores({n: p.detach() for n, p in module.named_parameters()},
                         lambda p: p.to(torch.float64, copy=True).pow_(2))
    return _l2_aggregate(groups, squares, None)


def _square_sums(groups, scores) -> Dict[Tuple[str, int], torch.Tensor]:
    """``{(target, dim): the score (a squared weight) summed over every dim but dim}`` for
    the members' tensors that ``scores`` holds (one squared tensor alive at a time)."""
    dims: Dict[str, set] = {}
    for g in groups:
        for m in g.members:
            if m.target in scores:
                dims.setdefault(m.target, set()).add(m.dim)
    out = {}
    for target, wanted in dims.items():
        sq = scores[target].detach()
        for dim in sorted(wanted):
            out[target, dim] = _sum_but(sq, dim)
    return out


def _sum_but(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``t`` over every dim but ``dim`` (reductions over contiguous blocks: a
    transpose first would copy the tensor, slowly for a 3x3 conv's input dim)."""
    n = t.shape[dim]
    if dim == 0:
        return t.reshape(n, -1).sum(1) if t.dim() > 1 else t
    return t.reshape(math.prod(t.shape[:dim]), n, math.prod(t.shape[dim + 1:])).sum(0).sum(1)


def _per_channel(index_map, along: torch.Tensor, size: int) -> torch.Tensor:
    """Per channel c: the sum of ``along`` over ``index_map[c]``
    (:func:`.aggregate.member_channel_sums` on a precomputed ``along``)."""
    lengths = np.fromiter(map(len, index_map), dtype=np.int64, count=len(index_map))
    positions = np.fromiter(itertools.chain.from_iterable(index_map), dtype=np.int64,
                            count=int(lengths.sum()))
    out = torch.zeros(size, dtype=along.dtype, device=along.device)
    if positions.size:
        channels = np.repeat(np.arange(len(index_map), dtype=np.int64), lengths)
        out.index_add_(0, torch.from_numpy(channels).to(along.device),
                       along[torch.from_numpy(positions).to(along.device)])
    return out


def _random_aggregate(groups, scores, ctx):
    generator = torch.Generator().manual_seed(int(ctx.options.get("seed", 0)))
    return {g.id: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in groups}


@criterion("l2", "L2 norm of every member slice of a channel (data-free)", needs_data=False,
           aggregate=_l2_aggregate, options=())
def _l2(ctx: ScoringContext) -> Mapping:
    return LazyScores(_params(ctx), lambda p: p.pow(2), finite=_squares_finite)


@criterion("random", "uniformly random channel scores (seeded baseline)", needs_data=False,
           aggregate=_random_aggregate, options=("seed",))
def _zeros(ctx: ScoringContext) -> Dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p) for name, p in _params(ctx).items()}
