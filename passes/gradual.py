"""Gradual pruning on channel masks: the OBA paper's procedure (issue 12, item 3).

Prune in ``N`` small steps on an exponential schedule to the budget, re-scoring on the
calibration batches after every step, with no fine-tuning in between -- on *one* traced
and analysed graph. Each step scores the dense graph with every channel removed so far
*masked* (:func:`fxprune.passes.verify.masked_reference`: cut at its consumers and
producers, norms over pruned dims with kept-only statistics), which computes exactly
what the rewritten model of the steps so far computes; the caller rewrites once, at the
end. N steps cost N scoring passes (steps whose budget already holds are not scored),
plus a deep copy per step; no re-trace, re-analysis or rewrite. With
``Gradual(repair=...)`` each scored step instead sees the plan so far as the repair pass
leaves it (:func:`step_analysis`: one rewrite and one repair per scored step, the result
carried back into the masked copy by :mod:`.carry`): the masked dense weights keep BN
statistics of channels that are gone, which misleads data-driven scores more with every step.

Contract (:func:`prune_gradually`): reads the dense :class:`Analysis`, its prunable
groups, the dense per-group removal caps, a :class:`Budget` (flops or params), a
``score`` callback and the exact cost model; returns ``{group id: kept channels}`` in
the dense numbering, every group of ``caps`` included. Invariants:

* step k's target is ``ratio ** (k / N)`` of the dense cost (exponential in the kept
  fraction, the reference code's ``exponential_scheduler``); the last step's target is
  exactly ``ratio``; the cost of a plan is the dense cost model under the cumulative
  keep mask;
* channels removed at a step stay removed: later steps rank only the remaining
  channels, with scores, tie-break keys and the group normaliser (÷ mean or ÷ max)
  computed over the remaining channels only (with ``cost_aware``, also the saving of one
  channel, on the plan so far), and caps counted against the dense size
  (``max_layer_sparsity`` of the dense group), as the rewrite-based iterative mode
  (``compile(flops=[...])``) ranks the channels of its re-analysed slim model. Given
  the same scores the two give the same plan;
* with ``fill``, the steps are those without it and only the final plan gives back
  the slack below the budget (so it keeps every channel the unfilled plan keeps);
* the dense analysis (its GraphModule, groups and parameters) is never changed.

The ``score`` callback gets the step's masked :class:`Analysis` and the kept channels
and returns ``(channel scores, tie-break keys or None)`` per group id, dense-sized; only
the kept entries are read. :class:`Gradual` carries the step count and the reference
code's scoring conditions (batch-statistics BN, mean over a group's non-zero layers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import BudgetError, FxpruneError
from ..group import Group
from .carry import carry_tensors
from .fill import give_back
from .groups import Analysis
from .repair import REPAIR_MODES, log as repair_log, repair as repair_pass
from .rewrite import rewrite
from .select import DEFAULT_NORMALIZE, Budget, global_order, select_budget
from .unit_cost import unit_costs
from .verify import masked_reference
from .widths import unit_step

__all__ = ["Gradual", "STEP_REPAIRS", "as_gradual", "resolve_step_repair", "schedule",
           "masked_analysis", "step_analysis", "prune_gradually"]

#: ``Gradual(repair=...)`` values: the repair pass's modes that carry between steps, and
#: ``"auto"`` (compile's own ``repair=`` mode).
STEP_REPAIRS = ("auto",) + REPAIR_MODES

log = logging.getLogger(__name__)

Kept = Dict[str, List[int]]
Scores = Dict[str, torch.Tensor]
ScoreFn = Callable[[Analysis, Kept], Tuple[Scores, Optional[Scores]]]


@dataclasses.dataclass(frozen=True)
class Gradual:
    """Gradual pruning settings (``compile(steps=...)`` takes an int or one of these).

    ``steps``: number of pruning steps (the OBA paper uses 50). ``bn_train``: score with
    every BatchNorm module normalising by the calibration batch's statistics, as the
    reference code scores in train mode (running statistics are neither used nor
    updated; functional ``F.batch_norm`` calls keep their own flag). ``layer_mean``:
    divide each group's channel scores by the number of the group's members (weights,
    biases, norm affines) with a non-zero score on the remaining channels -- the
    reference code's ``group_reduction="mean"``. A per-group constant, it changes the
    ranking only with ``normalize=None``: ÷ group mean and ÷ group max cancel it.
    (÷ group max itself, the reference's ``normalizer="max"``, is ``normalize="max"``:
    per step, over the group's remaining channels.) ``repair``: ``"bn"`` or ``"full"``
    makes every step score the plan so far *as the repair pass leaves it* (the repair of
    that mode on the rewritten plan, carried back into the masked model:
    :func:`step_analysis`), instead of the masked dense weights and their BN statistics,
    which go stale as channels go; it costs one rewrite and one repair per scored step.
    ``None`` scores the masked dense weights (the paper's procedure). ``"auto"`` (the
    default) follows the final repair: ``compile`` resolves it to its own ``repair=`` mode
    (:func:`resolve_step_repair`), so that the steps see what the returned model will be.
    """

    steps: int
    bn_train: bool = False
    layer_mean: bool = False
    repair: Optional[str] = "auto"

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise BudgetError(f"steps={self.steps!r} must be a positive integer: the number "
                              "of gradual pruning steps (the OBA paper uses 50)")
        if self.repair not in STEP_REPAIRS:
            raise BudgetError(f"Gradual(repair={self.repair!r}): use 'auto' (as the final "
                              "repair), 'bn' (BN statistics re-estimated between steps), "
                              "'full' (also layers re-fitted) or None")


def as_gradual(steps) -> Optional[Gradual]:
    """``None`` -> None; an int -> ``Gradual(steps)``; a :class:`Gradual` as is."""
    if steps is None or isinstance(steps, Gradual):
        return steps
    return Gradual(steps)


def resolve_step_repair(gradual: Optional[Gradual], final_repair: Optional[str]
                        ) -> Optional[Gradual]:
    """``gradual`` with ``repair="auto"`` replaced by the final repair's mode."""
    if gradual is None or gradual.repair != "auto":
        return gradual
    return dataclasses.replace(gradual, repair=final_repair)


def schedule(budget: Budget, steps: int) -> List[Budget]:
    """The per-step targets: ``ratio ** (k / steps)`` for k = 1..steps, the last exactly
    ``ratio``. Only costed budgets of kept fractions (flops, params, latency: the
    :data:`~.budget.BUDGETS` kinds with a cost) have a gradual schedule."""
    if budget.spec.cost is None or not budget.spec.kept:
        raise BudgetError(f"steps= needs a flops=r or params=r (or latency=r) budget, not "
                          f"{budget.kind}=: the schedule is exponential in the kept fraction "
                          "of the cost")
    ratios = [budget.ratio ** (k / steps) for k in range(1, steps)] + [budget.ratio]
    return [Budget(budget.kind, r) for r in ratios]


def masked_analysis(dense: Analysis, kept: Kept, bn_train: bool = False) -> Analysis:
    """``dense`` with its GraphModule replaced by the masked reference of ``kept`` (a new
    module; ``dense`` is untouched). ``bn_train``: its BatchNorm modules normalise by
    batch statistics (their running statistics are dropped from the copy), which keeps
    removed channels exact: a masked channel enters its BN as a constant."""
    gm = masked_reference(dense, kept)
    if bn_train:
        for mod in gm.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                # torch's BN uses batch statistics in eval mode too when both are None
                mod.running_mean, mod.running_var = None, None
                mod.num_batches_tracked, mod.track_running_stats = None, False
    return dataclasses.replace(dense, gm=gm)


def step_analysis(dense: Analysis, kept: Kept, gradual: Gradual,
                  inputs: Optional[Sequence[Tuple[Any, ...]]] = None) -> Analysis:
    """What a step scores: :func:`masked_analysis` of ``kept``; with ``gradual.repair``,
    holding the weights and BN statistics that the repair pass of that mode gives the
    slim model of ``kept`` (rewritten from the dense analysis and repaired against it on
    ``inputs``, the calibration batches' input tuples), so that every step sees the plan
    so far as the final repair will leave it. ``dense`` is untouched."""
    masked = masked_analysis(dense, kept, gradual.bn_train)
    # "auto" outside compile (nothing to follow: :func:`resolve_step_repair`) repairs nothing
    if gradual.repair in (None, "auto") or dense.keep_mask(kept).all():  # nothing removed
        return masked
    if not inputs:
        raise FxpruneError(f"Gradual(repair={gradual.repair!r}) repairs between steps on "
                           "calibration data: pass data=")
    slim = rewrite(dense, kept)
    with _quiet(repair_log):  # its table and warnings, once per step; the final repair's show
        repair_pass(dense.gm, slim, dense, kept, inputs, gradual.repair)
    carry_tensors(dense, slim, kept, masked.gm)
    return masked


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """``logger`` at ERROR level for the block."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _step_caps(groups: List[Group], caps: Dict[str, int], kept: Kept,
               max_layer_sparsity: float) -> Dict[str, int]:
    """Channels each group may still lose: the dense cap less those already removed, and
    no more than a fresh analysis of the slim model would allow (what the rewrite-based
    iterative mode computes, so that the two agree)."""
    out = {}
    for g in groups:
        left = len(kept[g.id])
        fresh = min(left - 1, int(math.floor(max_layer_sparsity * left)))
        out[g.id] = max(0, min(fresh, caps[g.id] - (g.size - left)))
    return out


def _remaining_order(groups: List[Group], scores: Scores, tiebreak: Optional[Scores],
                     kept: Kept, caps: Dict[str, int], normalize: Optional[str],
                     check: Optional[Callable],
                     cost: Optional[Callable[[Kept], float]] = None) -> List[Tuple[str, int]]:
    """The global removal order of the remaining channels (dense numbering), ranked as
    :func:`global_order` ranks a model that has only those channels; with ``cost`` (the
    plan -> cost model, cost-aware ranking) each group's scores are divided by what one
    of its remaining channels saves from the plan so far (:func:`~.unit_cost.unit_costs`
    on that model, as one-shot selection measures savings on the model it prunes)."""
    index = {g.id: torch.as_tensor(kept[g.id], dtype=torch.long) for g in groups}
    compact = [Group(g.id, len(kept[g.id])) for g in groups]
    sub = {gid: scores[gid].detach()[ix.to(scores[gid].device)] for gid, ix in index.items()}
    sub_tb = None if tiebreak is None else {
        gid: tiebreak[gid].detach()[ix.to(tiebreak[gid].device)] for gid, ix in index.items()}
    if check is not None:
        check(compact, sub, caps)
    savings = None
    if cost is not None:
        def compact_cost(plan: Kept) -> float:  # compact numbering -> the dense plan's cost
            return cost({**kept, **{gid: [kept[gid][c] for c in cs]
                                    for gid, cs in plan.items()}})
        savings = unit_costs(compact, sub, caps, compact_cost)
    order = global_order(compact, sub, caps, normalize, tiebreak=sub_tb, savings=savings)
    return [(gid, kept[gid][c]) for gid, c in order]


def prune_gradually(dense: Analysis, groups: List[Group], budget: Budget, gradual: Gradual,
                    score: ScoreFn, cost: Callable[[Kept], float], dense_total: float,
                    caps: Dict[str, int], max_layer_sparsity: float, *,
                    normalize: Optional[str] = DEFAULT_NORMALIZE,
                    check: Optional[Callable] = None,
                    inputs: Optional[Sequence[Tuple[Any, ...]]] = None,
                    cost_aware: bool = False, fill: bool = False, round_to: int = 1) -> Kept:
    """Kept channels after ``gradual.steps`` mask-based steps (see the module doc).

    ``groups``: the prunable, not ignored groups; ``caps``: their dense removal caps
    (:func:`~.select.removable_counts`); ``cost(kept)``: the cost model's count under a
    plan; ``check(groups, scores, caps)``: optional degenerate-score check of each step's
    remaining-channel scores; ``inputs``: the calibration input tuples that
    ``gradual.repair`` re-fits on (:func:`step_analysis`); ``cost_aware``: each step ranks
    by normalised score ÷ what one channel saves from the plan so far; ``fill``: the
    final plan gives back the slack below the budget, the latest removals first
    (:func:`~.fill.give_back`; the steps before are those without fill, so the filled
    plan keeps every channel the unfilled one keeps); ``round_to``: every group that loses
    channels keeps a multiple of ``round_to`` indices, rounded at each step as the
    iterative mode rounds its slim model (:mod:`.widths`). Raises
    :class:`BudgetError` when a step's target cannot be reached."""
    sizes = {g.id: g.size for g in groups}
    kept: Kept = {gid: list(range(n)) for gid, n in sizes.items()}
    removed: List[Tuple[str, int]] = []  # in removal order: replayed as the order's prefix
    targets = schedule(budget, gradual.steps)
    for k, step in enumerate(targets):
        if cost(kept) <= step.ratio * dense_total * (1 + 1e-9):
            log.info("gradual step %d/%d: %s=%.4f already holds", k + 1, len(targets),
                     step.kind, step.ratio)
            continue
        log.info("gradual step %d/%d: scoring, then pruning to %s=%.4f", k + 1, len(targets),
                 step.kind, step.ratio)
        scores, tiebreak = score(step_analysis(dense, kept, gradual, inputs), kept)
        step_caps = _step_caps(groups, caps, kept, max_layer_sparsity)
        order = removed + _remaining_order(groups, scores, tiebreak, kept, step_caps,
                                           normalize, check, cost if cost_aware else None)
        new = select_budget(groups, scores, step, caps, cost, dense_total, order,
                            round_to=round_to,
                            base={gid: sizes[gid] - len(kept[gid]) for gid in sizes})
        # the prefix of already removed channels is always replayed: the plan without
        # them costs more than this step's target, so the bisection ends beyond them
        still = {gid: set(chans) for gid, chans in new.items()}
        removed = [(gid, c) for gid, c in order if c not in still[gid]]
        kept = new
    if not fill:
        return kept
    return _fill_final(groups, kept, removed, round_to,
                       lambda plan: cost(plan) <= budget.ratio * dense_total * (1 + 1e-9))


def _fill_final(groups: List[Group], kept: Kept, removed: List[Tuple[str, int]],
                round_to: int, fits: Callable[[Kept], bool]) -> Kept:
    """``fill=True`` on the last step's plan: its removals, latest first, given back
    while ``fits`` (:func:`~.fill.give_back`; ``removed`` lists each step's removals
    after the earlier steps', least important first, so the last step's most important
    removals come back first)."""
    mine: Dict[str, Tuple[List[int], List[int]]] = {g.id: ([], []) for g in groups}
    for place, (gid, c) in enumerate(removed):
        mine[gid][0].append(c)
        mine[gid][1].append(place)
    steps = {g.id: unit_step(g, round_to) for g in groups}
    return give_back(groups, kept, mine, steps, fits)

