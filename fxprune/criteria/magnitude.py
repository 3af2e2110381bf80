"""Data-free criteria: group weight norms and random (baselines, design §5.4)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Dict, Iterator

import torch

from . import ScoringContext, criterion
from .aggregate import channel_scores, root_of_sum


def _params(ctx: ScoringContext):
    return {name: p.detach() for name, p in ctx.module.named_parameters()}


class LazyScores(Mapping):
    """Per-parameter scores ``fn(p)`` computed on each access from the weights: a
    magnitude score is a cheap function of them, and holding it would be a second copy
    of every weight (1.8 B parameters: 7 GiB). Reads the weights as they are at access
    time (``compile``'s dense graph reads the model's own tensors)."""

    lazy = True

    def __init__(self, params: Dict[str, torch.Tensor], fn: Callable):
        self._params, self._fn = params, fn

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fn(self._params[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


@criterion("l1", "L1 norm of every member slice of a channel (data-free)", needs_data=False,
           options=())
def _l1(ctx: ScoringContext) -> Mapping:
    return LazyScores(_params(ctx), torch.abs)


def _l2_aggregate(groups, scores, ctx):
    # the group's weight norm over all member slices: sqrt of the summed squares
    return channel_scores(groups, scores, transform=root_of_sum)


def _random_aggregate(groups, scores, ctx):
    generator = torch.Generator().manual_seed(int(ctx.options.get("seed", 0)))
    return {g.id: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in groups}


@criterion("l2", "L2 norm of every member slice of a channel (data-free)", needs_data=False,
           aggregate=_l2_aggregate, options=())
def _l2(ctx: ScoringContext) -> Mapping:
    return LazyScores(_params(ctx), lambda p: p.pow(2))


@criterion("random", "uniformly random channel scores (seeded baseline)", needs_data=False,
           aggregate=_random_aggregate, options=("seed",))
def _zeros(ctx: ScoringContext) -> Dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p) for name, p in _params(ctx).items()}
