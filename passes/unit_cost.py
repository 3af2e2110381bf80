"""Cost-aware ranking for the selection pass: what one channel of each group saves.

A flops / params / latency budget is a knapsack: remove channels whose summed importance
is smallest *for the cost they save*. The plain global order (:mod:`.select`) ranks by
(normalised) score alone, so a channel of a cheap layer and a channel of an expensive
one go at the same score; with ``cost_aware=True`` the key is score ÷ the channel's
saving, the greedy solution of that knapsack (the ordering is unchanged by a common
factor, so savings need no normalisation).

Contract: :func:`unit_costs` reads the groups in the step's caps, their scores, the
budget's cost function (a kept plan -> cost) and the dense plan's cost; it returns, per
group with a removable channel, the mean saving of one channel: (cost with nothing
removed − cost with the group's ``cap`` least important channels removed, every other
group whole) ÷ ``cap``. That is exact for costs linear in a group's width (a conv's
FLOPs in one of its two groups) and the mean over the removed channels where a group
spans layers of different costs. Savings are measured on the model being pruned (the
dense one in one-shot pruning); as every group shrinks, a layer's saving per channel
shrinks with its other group's width, which leaves the ratios of a uniformly slimmed
model unchanged. Invariant: one cost evaluation per group; nothing is mutated.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np

__all__ = ["MIN_SAVING", "unit_costs"]

#: Floor of a saving relative to the largest one: a channel that saves (almost) nothing
#: goes after every channel that saves something, without dividing by zero.
MIN_SAVING = 1e-9


def unit_costs(groups, scores, caps: Dict[str, int],
               cost: Callable[[Dict[str, List[int]]], float]) -> Dict[str, float]:
    """``{group id: mean cost saved per removed channel}`` (module docstring)."""
    whole = cost({})
    out: Dict[str, float] = {}
    for g in groups:
        cap = caps.get(g.id, 0)
        if cap == 0:
            continue
        values = scores[g.id].detach().abs().double().cpu().numpy()
        gone = np.argsort(values, kind="stable")[:cap]
        kept = sorted(set(range(g.size)) - set(gone.tolist()))
        out[g.id] = (whole - cost({g.id: kept})) / cap
    top = max(out.values(), default=0.0)
    floor = MIN_SAVING * top if top > 0 else 1.0
    return {gid: max(v, floor) for gid, v in out.items()}
