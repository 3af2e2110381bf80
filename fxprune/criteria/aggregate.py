"""From per-parameter scores to per-channel scores (design §5.5).

Contract: reads groups and ``{parameter name: score tensor of its shape}``; returns
``{group id: tensor[group.size]}``. A channel's score is the signed sum of the scores
of every slice of every member of its group (output rows, input columns, biases,
norm affine entries), then its absolute value. Members that are buffers, or that a
criterion does not score, contribute zero. :func:`weight_norms` is the same aggregation
of squared weights under a square root: the ``"l2"`` criterion's channel score, and the
tie-break key of selection (design §5.5).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ..group import Group, Member


def member_channel_sums(member: Member, score: torch.Tensor, size: int) -> torch.Tensor:
    """Per channel: sum of ``score`` over the member's slices of that channel."""
    along = score.transpose(0, member.dim).reshape(score.shape[member.dim], -1).sum(1)
    positions, channels = [], []
    for c, idx in enumerate(member.index_map):
        positions.extend(idx)
        channels.extend([c] * len(idx))
    out = torch.zeros(size, dtype=along.dtype, device=along.device)
    if positions:
        out.index_add_(0, torch.as_tensor(channels, device=along.device),
                       along[torch.as_tensor(positions, device=along.device)])
    return out


def signed_channel_sums(groups: Iterable[Group], scores: Dict[str, torch.Tensor],
                        roles: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Signed per-channel sums over members (optionally only members with ``roles``)."""
    wanted = set(roles) if roles is not None else None
    out = {}
    for g in groups:
        total = None
        for m in g.members:
            if m.target not in scores or (wanted is not None and m.role not in wanted):
                continue
            part = member_channel_sums(m, scores[m.target].detach(), g.size)
            total = part if total is None else total + part.to(total.dtype)
        if total is None:
            total = torch.zeros(g.size, dtype=torch.float64)
        out[g.id] = total
    return out


def channel_scores(groups: Iterable[Group], scores: Dict[str, torch.Tensor],
                   transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   roles: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Default aggregation: |signed sum| per channel (``transform`` replaces the abs),
    over the members with ``roles`` (all members when None)."""
    sums = signed_channel_sums(groups, scores, roles=roles)
    fn = transform or torch.abs
    return {gid: fn(s) for gid, s in sums.items()}


def root_of_sum(s: torch.Tensor) -> torch.Tensor:
    """sqrt of a per-channel sum of squares (rounding cannot make it negative)."""
    return s.clamp_min(0).sqrt()


def weight_norms(groups: Iterable[Group], module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``{group id: float64 tensor[size]}``: every channel's L2 norm over all member slices
    that are parameters of ``module`` (the ``"l2"`` criterion's channel score, computed in
    float64 so that float16 weights do not overflow; one squared tensor alive at a time)."""
    return root_sum_channel_scores(
        groups, dict(module.named_parameters()),
        square=lambda p: p.to(torch.float64, copy=True).pow_(2))


def root_sum_channel_scores(groups: Iterable[Group], scores: Mapping,
                            square: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                            ) -> Dict[str, torch.Tensor]:
    """:func:`channel_scores` with :func:`root_of_sum` (sqrt of the summed ``scores`` over
    every member slice), computed with each tensor read (and ``square``d, when given)
    once, and each (tensor, dim) it is sliced along summed once, however many members
    and groups read it. ``scores`` may be lazy (a Mapping computing on access)."""
    groups = list(groups)
    along = _sums_along(groups, scores, square)
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


def _sums_along(groups: List[Group], scores: Mapping, square) -> Dict[Tuple[str, int], torch.Tensor]:
    """``{(target, dim): the score summed over every dim but dim}`` for the members'
    tensors that ``scores`` holds (one score tensor alive at a time)."""
    dims: Dict[str, set] = {}
    for g in groups:
        for m in g.members:
            if m.target in scores:
                dims.setdefault(m.target, set()).add(m.dim)
    out = {}
    for target, wanted in dims.items():
        t = scores[target].detach()
        t = square(t) if square is not None else t
        for dim in sorted(wanted):
            out[target, dim] = _sum_but(t, dim)
    return out


def _sum_but(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``t`` over every dim but ``dim`` (reductions over contiguous blocks: a
    transpose first would copy the tensor, slowly for a 3x3 conv's input dim)."""
    n = t.shape[dim]
    if dim == 0:
        return t.reshape(n, -1).sum(1) if t.dim() > 1 else t
    return t.reshape(math.prod(t.shape[:dim]), n, math.prod(t.shape[dim + 1:])).sum(0).sum(1)


def _per_channel(index_map, along: torch.Tensor, size: int) -> torch.Tensor:
    """Per channel c: the sum of ``along`` over ``index_map[c]`` (what
    :func:`member_channel_sums` scatters, on a precomputed ``along``)."""
    lengths = np.fromiter(map(len, index_map), dtype=np.int64, count=len(index_map))
    positions = np.fromiter(itertools.chain.from_iterable(index_map), dtype=np.int64,
                            count=int(lengths.sum()))
    out = torch.zeros(size, dtype=along.dtype, device=along.device)
    if positions.size:
        channels = np.repeat(np.arange(len(index_map), dtype=np.int64), lengths)
        out.index_add_(0, torch.from_numpy(channels).to(along.device),
                       along[torch.from_numpy(positions).to(along.device)])
    return out
