"""Selection pass: channel scores + a budget -> kept channels per group (design §6).

Contract: reads the groups, one score tensor per prunable group (higher = more
important), optionally one *tie-break* tensor per group, and a :class:`Budget`; returns
``{group id: sorted kept indices}`` for every prunable group. Invariants: every group
keeps at least one channel and at most ``max_layer_sparsity`` of its channels are
removed; every member tensor dim of a group keeps at least one index (a group merged
from several layers, e.g. a concat gated by SE, never loses all channels of one layer:
a conv cannot have zero output or input channels); ignored and unprunable groups keep
everything.

Ranking: channels go least important first by |score|; globally the scores are first
divided by their group's mean |score| (``DEFAULT_NORMALIZE``; ÷ group maximum or raw
scores as options) so that groups of different sizes compete fairly (design §5.5).
Ties (equal normalised scores) are broken by the tie-break key, lowest first: ``compile``
passes every channel's weight norm (the L2 norm over all member slices, the ``"l2"``
criterion's channel score, :func:`fxprune.criteria.aggregate.weight_norms`), normalised
like the scores. Only channels whose score *and* weight norm are equal fall back to
group order and channel index. :func:`tied_groups` names the groups whose scores carry
no ranking at all (all zero or all equal); ``compile`` turns them into an error or a
warning (:mod:`.degenerate`). The removal prefix of the global order is found by
bisection on the exact cost model (:mod:`.count`); each prefix's plan comes from
:mod:`.prefix` (per-group work done once, not per bisection step).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import BudgetError
from ..group import Group
from .budget import Budget
from .fill import give_back
from .prefix import PrefixPlans, SpanGuard
from .unit_cost import unit_costs
from .widths import rounded_removal, unit_step

Scores = Dict[str, torch.Tensor]  # group id -> one value per channel


def removable_counts(groups: Sequence[Group], max_layer_sparsity: float) -> Dict[str, int]:
    """How many channels each prunable group may lose at most."""
    if not 0.0 <= max_layer_sparsity < 1.0:
        raise BudgetError(f"max_layer_sparsity={max_layer_sparsity} must be in [0, 1)")
    return {g.id: min(g.size - 1, int(math.floor(max_layer_sparsity * g.size)))
            for g in groups if g.prunable}


def select_uniform(groups, scores: Scores, sparsity: float, caps: Dict[str, int], *,
                   tiebreak: Optional[Scores] = None, round_to: int = 1,
                   offsets: Optional[Dict[str, int]] = None) -> Dict[str, List[int]]:
    """Remove ``floor(sparsity * size)`` lowest-scored channels of every group (rounded
    to keep multiples of ``round_to``: :mod:`.widths`; ``offsets``: kept channels of a
    group's dense group outside it, counted in the rounded width); equal scores go lowest
    ``tiebreak`` (weight norm) first."""
    offsets = offsets or {}
    kept = {}
    guard = SpanGuard([g for g in groups if g.id in caps])
    for g in groups:
        if g.id not in caps:
            continue
        n_remove = rounded_removal(g.size + offsets.get(g.id, 0),
                                   min(caps[g.id], int(math.floor(sparsity * g.size))),
                                   caps[g.id], unit_step(g, round_to))
        removed = set()
        for c in _ascending(scores[g.id], _key(tiebreak, g.id)).tolist():
            if len(removed) >= n_remove:
                break
            if guard.remove(g.id, c):
                removed.add(c)
        kept[g.id] = [c for c in range(g.size) if c not in removed]
    return kept


def _magnitudes(score: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if score is None else score.detach().double().abs().cpu().numpy()


def _key(tiebreak: Optional[Scores], gid: str) -> Optional[np.ndarray]:
    return _magnitudes(tiebreak.get(gid)) if tiebreak is not None else None


def _ascending(score: torch.Tensor, secondary: Optional[np.ndarray] = None) -> np.ndarray:
    """Channel indices by ascending |score|, equal scores by ascending ``secondary``."""
    values = _magnitudes(score)
    if secondary is None:
        return np.argsort(values, kind="stable")
    return np.lexsort((secondary, values))  # the last key is the primary one


def tied_groups(groups, scores: Scores, caps: Dict[str, int]) -> Dict[str, str]:
    """``{group id: "zero" | "equal"}`` for the groups with a removable channel whose
    |scores| are all zero or all equal (up to a few ulps of the scores' dtype): their
    scores cannot rank their channels."""
    out = {}
    for g in groups:
        if caps.get(g.id, 0) == 0 or g.id not in scores:
            continue
        score = scores[g.id].detach()
        s = _magnitudes(score)
        if s.size < 2 or not np.isfinite(s).all():
            continue  # non-finite scores are refused by the scoring API
        eps = torch.finfo(score.dtype).eps if score.is_floating_point() else 0.0
        top = float(s.max())
        if top == 0.0:
            out[g.id] = "zero"
        elif top - float(s.min()) <= 8 * eps * top:
            out[g.id] = "equal"
    return out


NORMALIZERS = ("max", "mean", None)
DEFAULT_NORMALIZE = "mean"  # kept more accuracy than "max" (benchmarks/quality/RESULTS.md)


def check_normalize(normalize) -> None:
    """Raise ``BudgetError`` unless ``normalize`` names a global-ranking normaliser."""
    if normalize not in NORMALIZERS:
        raise BudgetError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")


def _group_scale(s: np.ndarray, normalize: Optional[str]) -> float:
    """The divisor that makes one group's |scores| comparable with other groups'."""
    scale = {"max": s.max, "mean": s.mean}.get(normalize) if s.size else None
    value = scale() if scale is not None else 1.0
    return value if value > 0 else 1.0


def global_order(groups, scores: Scores, caps: Dict[str, int],
                 normalize: Optional[str] = DEFAULT_NORMALIZE, *,
                 tiebreak: Optional[Scores] = None,
                 savings: Optional[Dict[str, float]] = None):
    """All removable channels as (group id, channel), least important first; each
    group contributes only its ``cap`` lowest channels. ``normalize="mean"`` ranks
    scores relative to their group's mean |score| (Torch-Pruning's default normaliser);
    ``"max"`` relative to the group's maximum (design §5.5); ``None`` ranks the raw
    |scores| (absolute loss-change estimates of second-order criteria compete as is).
    Equal normalised scores are ordered by ``tiebreak`` (weight norm), normalised the
    same way, so that tied groups interleave by relative norm. ``savings`` (cost-aware
    ranking, :func:`~.unit_cost.unit_costs`): each group's normalised scores are divided
    by what one of its channels saves."""
    check_normalize(normalize)
    ids, entry_group, channels = _order_arrays(groups, scores, caps, normalize, tiebreak,
                                               savings)
    return [(ids[i], c) for i, c in zip(entry_group.tolist(), channels.tolist())]


def _order_arrays(groups, scores: Scores, caps: Dict[str, int], normalize: Optional[str],
                  tiebreak: Optional[Scores], savings: Optional[Dict[str, float]] = None):
    """:func:`global_order` as arrays: (group ids, group index per entry, channel per
    entry). Sorted by (normalised score, normalised tie-break) with a stable sort, so
    equal keys keep group order and each group's own ascending order. ``savings``
    (cost-aware ranking, :mod:`.unit_cost`): the normalised scores of a group are
    divided by what one of its channels saves."""
    ids, keys, secondary, groups_of, chans = [], [], [], [], []
    for g in groups:
        if g.id not in caps or caps[g.id] == 0:
            continue
        s = _magnitudes(scores[g.id])
        top = _group_scale(s, normalize)
        w = _key(tiebreak, g.id)
        w = np.zeros_like(s) if w is None else w / _group_scale(w, normalize)
        order = _ascending(scores[g.id], w)[:caps[g.id]]
        keys.append(s[order] / (top if savings is None else top * savings[g.id]))
        secondary.append(w[order])
        groups_of.append(np.full(len(order), len(ids), dtype=np.int64))
        chans.append(order.astype(np.int64))
        ids.append(g.id)
    if not ids:
        return ids, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    perm = np.lexsort((np.concatenate(secondary), np.concatenate(keys)))
    return ids, np.concatenate(groups_of)[perm], np.concatenate(chans)[perm]


def select_budget(groups, scores, budget: Budget, caps: Dict[str, int],
                  cost: Callable[[Dict[str, List[int]]], float], dense: float,
                  order: Optional[list] = None, normalize: Optional[str] = DEFAULT_NORMALIZE,
                  *, tiebreak: Optional[Scores] = None, round_to: int = 1,
                  cost_aware: bool = False, fill: bool = False,
                  base: Optional[Dict[str, int]] = None,
                  offsets: Optional[Dict[str, int]] = None) -> Dict[str, List[int]]:
    """Smallest removal prefix (in ``order``, by default :func:`global_order` with
    ``tiebreak``) whose cost is within budget. With ``round_to`` > 1 each group's share
    of the prefix is rounded so that it keeps a multiple of ``round_to`` indices
    (:mod:`.widths`), taking or leaving its next channels in ``order``. With
    ``cost_aware`` the default order ranks by normalised score ÷ the cost one channel
    of the group saves (:mod:`.unit_cost`). With ``fill`` the prefix's removals are then
    given back, latest in the order first, while the budget still holds
    (:func:`~.fill.give_back`): the prefix's last removal can be a large unit (a head)
    that lands far below the target, and the slack it leaves is channels the model
    could keep. ``base`` (gradual steps, :class:`~.prefix.PrefixPlans`): per group, how
    many of its first entries in ``order`` earlier steps removed. ``offsets`` (the
    iterative mode, :func:`~.compose.step_limits`): per group, kept channels of its
    dense group outside it, counted in the width that ``round_to`` rounds."""
    in_caps = [g for g in groups if g.id in caps]
    steps = {g.id: unit_step(g, round_to) for g in in_caps}
    if order is None:
        check_normalize(normalize)
        savings = unit_costs(in_caps, scores, caps, cost) if cost_aware else None
        plans = PrefixPlans(in_caps, caps, steps, arrays=_order_arrays(
            groups, scores, caps, normalize, tiebreak, savings), base=base, offsets=offsets)
    else:
        plans = PrefixPlans(in_caps, caps, steps, order, base=base, offsets=offsets)
    costs: Dict[tuple, float] = {}  # plan key -> cost: equal prefixes' plans cost once

    def cost_at(k: int) -> float:
        key = plans.key(k)
        if key not in costs:
            costs[key] = cost(plans.kept(key))
        return costs[key]

    target = budget.ratio * dense
    lo, hi = 0, len(plans)
    if cost_at(hi) > target * (1 + 1e-9):
        best = cost_at(hi) / dense
        raise BudgetError(
            f"{budget.kind}={budget.ratio} cannot be reached: the best reachable ratio is "
            f"{best:.3f} (limited by max_layer_sparsity, at least one channel per group, "
            + (f"kept widths in multiples of round_to={round_to}, " if round_to > 1 else "")
            + "and groups that are not prunable)")
    key = plans.key(_first_within(cost_at, target, lo, hi))
    if not fill:
        return plans.kept(key)
    return give_back(in_caps, plans.kept(key), plans.removed(key), steps,
                     lambda kept: cost(kept) <= target * (1 + 1e-9))


def _first_within(cost_at: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """The smallest ``k`` in ``[lo, hi]`` with ``cost_at(k) <= target`` (up to rounding),
    by bisection: the cost does not rise with ``k`` and ``cost_at(hi)`` is within."""
    while lo < hi:
        mid = (lo + hi) // 2
        if cost_at(mid) <= target * (1 + 1e-9):
            hi = mid
        else:
            lo = mid + 1
    return lo


def select_uniform_budget(groups, scores: Scores, budget: Budget, caps: Dict[str, int],
                          cost: Callable[[Dict[str, List[int]]], float], dense: float, *,
                          tiebreak: Optional[Scores] = None, round_to: int = 1,
                          offsets: Optional[Dict[str, int]] = None
                          ) -> Dict[str, List[int]]:
    """``compile(uniform=True)``: the smallest *uniform* sparsity (the same fraction of
    every group removed, :func:`select_uniform`) whose cost is within budget, so that
    layers of one kind (heads, MLP units) keep equal counts, as a Hugging Face config
    needs. Candidate sparsities are the breakpoints ``k / size`` of the group sizes (the
    cost only changes there); bisection on them, the cost falling with the sparsity."""
    live = [g for g in groups if g.id in caps]
    # sparsity 0 is always a candidate: with no group left to prune (all ignored, or
    # capped by earlier steps) the plan removes nothing, and the budget check says so
    points = sorted({0.0} | {k / g.size for g in live for k in range(caps[g.id] + 1)})
    kept_at = lambda i: select_uniform(groups, scores, points[i] + 1e-12, caps,
                                       tiebreak=tiebreak, round_to=round_to, offsets=offsets)
    target = budget.ratio * dense
    lo, hi = 0, len(points) - 1
    if cost(kept_at(hi)) > target * (1 + 1e-9):
        why = ("the smallest groups' max_layer_sparsity caps it" if live else
               "no group is left to prune")
        raise BudgetError(
            f"{budget.kind}={budget.ratio} cannot be reached with uniform=True: the same "
            f"fraction removed from every group reaches {cost(kept_at(hi)) / dense:.3f} at "
            f"best ({why}); lower the budget or drop uniform=True")
    return kept_at(_first_within(lambda i: cost(kept_at(i)), target, lo, hi))


def budget_blockers(all_groups: Sequence[Group], free: Sequence[str], keep_mask,
                    measure: Callable, dense: float, kind: str, top: int = 3) -> str:
    """The ``top`` groups that selection may not prune (not prunable, or ignored) and
    that hold the most of the budget's cost (``measure`` of the mask that removes all
    their channels, from the current model's cost; as a share of ``dense``), each with
    its share and reason: what a
    :class:`BudgetError` names so that the user sees what blocks the budget."""
    free, now = set(free), measure(keep_mask({}))  # (below dense after earlier steps)
    rows = []
    for g in all_groups:
        if g.id in free:
            continue
        held = now - measure(keep_mask({g.id: []}))
        if held > 0:
            rows.append((held, g))
    rows.sort(key=lambda r: (-r[0], r[1].id))
    if not rows:
        return ""
    parts = []
    for held, g in rows[:top]:
        reason = " ".join((g.reason or "ignored (ignore=)").split())
        reason = reason if len(reason) <= 240 else reason[:240] + "..."
        parts.append(f"`{g.id}` ({held / dense:.0%} of the {kind}): {reason}")
    return (f"; the groups holding the most {kind} that cannot be pruned: "
            + "; ".join(parts))


def step_caps(groups: Sequence[Group], max_layer_sparsity: float,
              allowance: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """:func:`removable_counts` for one pruning step. In iterative pruning
    (``allowance`` given: how many more channels each group may lose against its dense
    group's cap, :func:`.compose.step_limits`) the cap is the smaller of the two."""
    caps = removable_counts(groups, max_layer_sparsity)
    if allowance is None:
        return caps
    return {gid: max(0, min(cap, allowance.get(gid, 0))) for gid, cap in caps.items()}


def select_step(groups, scores: Scores, budget: Budget, caps: Dict[str, int], keep_mask,
                cost_now, dense_cost, *, order: Optional[list] = None,
                normalize: Optional[str] = DEFAULT_NORMALIZE,
                tiebreak: Optional[Scores] = None, round_to: int = 1,
                uniform: bool = False, cost_aware: bool = False,
                fill: bool = False, offsets: Optional[Dict[str, int]] = None
                ) -> Dict[str, List[int]]:
    """One step's kept channels under ``budget``: uniform for a kind without a cost
    (sparsity), else the budget's cost method of ``cost_now`` (the current model's
    :class:`~fxprune.passes.count.CostModel`, masks built by ``keep_mask``) against
    the dense total of ``dense_cost`` (:data:`~fxprune.passes.budget.BUDGETS`), by the
    global order (``cost_aware``: score ÷ saving, :mod:`.unit_cost`; ``fill``: the
    slack below the target given back, :func:`select_budget`) or, with ``uniform``, by
    one sparsity for all groups. ``offsets``: see :func:`select_budget`."""
    spec = budget.spec
    if cost_aware and (spec.cost is None or uniform or order is not None):
        why = ("a sparsity budget has no cost" if spec.cost is None else
               "uniform=True removes one fraction of every group" if uniform else
               "this criterion selects channels itself (its own order)")
        raise BudgetError(f"cost_aware=True cannot apply: {why}; drop cost_aware")
    if spec.cost is None:
        return select_uniform(groups, scores, budget.ratio, caps, tiebreak=tiebreak,
                              round_to=round_to, offsets=offsets)
    measure = getattr(cost_now, spec.cost)
    if uniform:
        return select_uniform_budget(groups, scores, budget, caps,
                                     lambda kept: measure(keep_mask(kept)),
                                     getattr(dense_cost, spec.dense_total),
                                     tiebreak=tiebreak, round_to=round_to, offsets=offsets)
    return select_budget(groups, scores, budget, caps, lambda kept: measure(keep_mask(kept)),
                         getattr(dense_cost, spec.dense_total), order, normalize,
                         tiebreak=tiebreak, round_to=round_to, cost_aware=cost_aware,
                         fill=fill, offsets=offsets)
