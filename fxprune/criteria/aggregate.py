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

from typing import Callable, Dict, Iterable, List, Optional

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
    float64 so that float16 weights do not overflow)."""
    groups: List[Group] = list(groups)
    wanted = {m.target for g in groups for m in g.members}
    squares = {n: p.detach().double().pow(2) for n, p in module.named_parameters()
               if n in wanted}
    return channel_scores(groups, squares, transform=root_of_sum)
