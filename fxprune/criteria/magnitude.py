"""Data-free criteria: group weight norms and random (baselines, design §5.4)."""
from __future__ import annotations

from typing import Dict

import torch

from . import ScoringContext, criterion
from .aggregate import channel_scores, root_of_sum


def _params(ctx: ScoringContext):
    return {name: p.detach() for name, p in ctx.module.named_parameters()}


@criterion("l1", "L1 norm of every member slice of a channel (data-free)", needs_data=False,
           options=())
def _l1(ctx: ScoringContext) -> Dict[str, torch.Tensor]:
    return {name: p.abs() for name, p in _params(ctx).items()}


def _l2_aggregate(groups, scores, ctx):
    # the group's weight norm over all member slices: sqrt of the summed squares
    return channel_scores(groups, scores, transform=root_of_sum)


def _random_aggregate(groups, scores, ctx):
    generator = torch.Generator().manual_seed(int(ctx.options.get("seed", 0)))
    return {g.id: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in groups}


@criterion("l2", "L2 norm of every member slice of a channel (data-free)", needs_data=False,
           aggregate=_l2_aggregate, options=())
def _l2(ctx: ScoringContext) -> Dict[str, torch.Tensor]:
    return {name: p.pow(2) for name, p in _params(ctx).items()}


@criterion("random", "uniformly random channel scores (seeded baseline)", needs_data=False,
           aggregate=_random_aggregate, options=("seed",))
def _zeros(ctx: ScoringContext) -> Dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p) for name, p in _params(ctx).items()}
