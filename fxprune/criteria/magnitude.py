"""Data-free criteria: group weight norms and random (baselines, design §5.4).

Magnitude scores are lazy (:class:`LazyScores`: computed from the weights on access,
never held) and say whether they are finite without being materialised
(:meth:`LazyScores.finite`). The ``"l2"`` channel score is
:func:`.aggregate.root_sum_channel_scores` of the squared weights.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Dict, Iterator, Optional

import torch

from . import ScoringContext, criterion
from .aggregate import root_sum_channel_scores


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
    (:func:`.aggregate.root_sum_channel_scores`: each tensor squared once, each
    (tensor, dim) summed once)."""
    return root_sum_channel_scores(groups, scores)


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
