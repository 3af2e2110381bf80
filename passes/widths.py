"""Hardware-friendly widths for the selection stage (``round_to=N``, issue 17).

Vector units and tensor cores run fastest when channel counts are multiples of 8, 16
or 32; a pruned layer of 61 channels can be slower than the dense one of 64. With
``round_to=N`` every group that loses channels keeps a multiple of N *tensor indices*:
a channel whose narrowest member slice spans ``w`` indices (a head of ``w`` dims, a conv
group of ``w`` channels) counts ``w``, so the kept channel count must be a multiple of
``N / gcd(N, w)`` (:func:`unit_step`). A group left whole keeps its size.

Reads: a group's members (their index maps) and a wanted removal count. Returns:
the removal count to use instead (:func:`rounded_removal`). Invariant: the rounded
count is 0 or leaves a positive multiple of the step, never exceeds the group's cap,
and is non-decreasing in the wanted count (so selection's bisection on the cost stays
valid).
"""
from __future__ import annotations

import math

from ..errors import BudgetError

__all__ = ["check_round_to", "unit_step", "rounded_removal"]


def check_round_to(round_to) -> int:
    """``round_to`` as a positive int, else :class:`BudgetError`."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise BudgetError(f"round_to={round_to!r} must be a positive integer (1 = no "
                          "rounding; 8, 16 or 32 suit most accelerators)")
    return round_to


def unit_step(group, round_to: int) -> int:
    """How many of ``group``'s channels make a multiple of ``round_to`` indices."""
    if round_to <= 1:
        return 1
    # the narrowest member slice per channel is the kernel width that matters: a fused
    # qkv head spans 3·d rows of qkv but d columns of proj (and d of each of q, k, v)
    widths = [len(m.index_map[0]) for m in group.members if m.index_map and m.index_map[0]]
    width = min(widths, default=1)
    return round_to // math.gcd(round_to, width)


def rounded_removal(size: int, wanted: int, cap: int, step: int) -> int:
    """The removal count nearest ``wanted`` (ties: remove more) that leaves a positive
    multiple of ``step`` channels, at most ``cap``; 0 when no such count exists."""
    if step <= 1 or wanted <= 0:
        return max(0, min(wanted, cap))
    down = wanted - (step - (size - wanted) % step) % step   # keeps the next multiple up
    up = wanted + (size - wanted) % step                     # keeps the next multiple down
    ok = [r for r in (down, up) if 1 <= r <= cap and size - r >= step]
    if not ok:
        return 0
    return min(ok, key=lambda r: (abs(r - wanted), -r))
