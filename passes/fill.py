"""Fill the slack a budget leaves (``fill=True``): give removed channels back.

Selection removes the shortest prefix of the global order that meets the budget. The
prefix's last removal can be a large unit -- a whole head, a channel of a wide residual
stream -- that lands well below the target (a ViT's 0.3 FLOPs budget kept 0.271); the
slack is capacity the slim model could keep.

Contract: :func:`give_back` reads a plan that meets the budget (``{group id: kept
channels}``), each group's removed channels in removal order with their places in the
global order, the groups' ``round_to`` steps (:mod:`.widths`) and ``fits(plan)``, the
budget test. It returns the plan with removed channels given back, the latest in the
order first, each one that still fits: the same plan as walking the removals backwards
and trying every one (``tests/test_select_fill.py`` keeps that walk as the reference),
with fewer cost evaluations -- a give-back that does not fit is not tried again for the
channels of its group that cost the same (equal slice widths in every member), since the
slack only shrinks and a cost of non-negative terms only grows as channels come back.
A group with ``step`` > 1 gives back ``step`` channels at a time, and after one that
does not fit, none. Invariants: the result keeps every channel the input keeps, meets
``fits``, and every group keeps a multiple of its step or all its channels.
"""
from __future__ import annotations

import heapq
from typing import Callable, Dict, List, Sequence, Tuple

from ..group import Group

__all__ = ["give_back"]

Kept = Dict[str, List[int]]


def _cost_class(group: Group, channel: int) -> Tuple[int, ...]:
    """What a channel's cost depends on: its slice width in every member."""
    return tuple(len(m.index_map[channel]) if channel < len(m.index_map) else 0
                 for m in group.members)


def give_back(groups: Sequence[Group], kept: Kept,
              removed: Dict[str, Tuple[List[int], List[int]]], steps: Dict[str, int],
              fits: Callable[[Kept], bool]) -> Kept:
    """``kept`` with removed channels given back while ``fits`` holds (module doc)."""
    by_id = {g.id: g for g in groups}
    plan = {gid: list(chans) for gid, chans in kept.items()}  # only a trial's group changes
    # per group, its removals latest first: (place in the order, channel)
    queues = {gid: sorted(zip(places, chans), reverse=True)
              for gid, (chans, places) in removed.items() if chans}
    heap = [(-q[0][0], gid) for gid, q in queues.items()]
    heapq.heapify(heap)
    while heap:
        _, gid = heapq.heappop(heap)
        queue, step = queues[gid], steps.get(gid, 1)
        unit = [c for _, c in queue[:step]]
        before = plan[gid]
        plan[gid] = sorted(before + unit)
        if fits(plan):
            del queue[:len(unit)]
        else:
            plan[gid] = before
            if step > 1:
                continue  # a coarser unit that does not fit: nothing more of this group
            dear = _cost_class(by_id[gid], unit[0])
            queue[:] = [e for e in queue if _cost_class(by_id[gid], e[1]) != dear]
        if queue:
            heapq.heappush(heap, (-queue[0][0], gid))
    return plan
