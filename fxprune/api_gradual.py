"""``compile(steps=N)``: the criterion, degenerate-score checks and cost model wired into
the mask-based gradual pass (:mod:`fxprune.passes.gradual`).

:func:`select_gradually` is what ``compile`` calls in place of score + select when
``steps`` is given: it returns the final plan (dense numbering) and the last step's
saliency; ``compile`` then rewrites, verifies and repairs once.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch

from .criteria import Criterion
from .criteria.aggregate import member_channel_sums, weight_norms
from .criteria.scoring import cast_batch, make_scoring_copy
from .errors import BudgetError, CriterionError, FxpruneError
from .group import Group
from .ignore import ignored
from .passes.budget import Budget
from .passes.degenerate import check_scores
from .passes.gradual import Gradual, prune_gradually, step_analysis
from .passes.groups import Analysis
from .passes.score import Saliency, score_analysis
from .passes.select import removable_counts

__all__ = ["select_gradually", "layer_means"]

log = logging.getLogger(__name__)


def check_gradual(gradual: Optional[Gradual], budgets: List[Budget], between_steps,
                  crit: Criterion, has_data: bool = True) -> None:
    """Refuse ``steps=`` combined with what it replaces or cannot rank."""
    if gradual is None:
        return
    if gradual.repair not in (None, "auto") and not has_data:
        raise FxpruneError(f"steps=Gradual(..., repair={gradual.repair!r}) repairs between "
                           "steps on calibration data: pass data=, or repair=None")
    if budgets[0].spec.cost is None:
        raise BudgetError(f"steps=N prunes to a flops=r or params=r (or latency=r) budget, "
                          f"not {budgets[0].kind}=r")
    if len(budgets) > 1 or between_steps is not None:
        raise BudgetError("steps=N prunes gradually to one budget without fine-tuning in "
                          "between: pass one flops=r or params=r (not a list) and no "
                          "between_steps, or drop steps= for the iterative mode")
    if crit.select is not None:
        raise CriterionError(f"criterion {crit.name!r} selects channels by its own greedy "
                             "procedure, which steps= cannot re-rank: use it without steps=")


def layer_means(groups: List[Group], param_scores: Dict[str, torch.Tensor],
                scores: Dict[str, torch.Tensor], kept: Dict[str, List[int]]):
    """Channel scores ÷ the number of the group's members (weights, biases, norm affines)
    whose scores are not all zero on the kept channels: the OBA reference code's
    ``group_reduction="mean"`` (a mean over the group's non-zero layers)."""
    out = dict(scores)
    for g in groups:
        rows = torch.as_tensor(kept[g.id], dtype=torch.long)
        live = sum(1 for m in g.members if m.target in param_scores and bool(
            member_channel_sums(m, param_scores[m.target].detach(), g.size)[rows].ne(0).any()))
        out[g.id] = scores[g.id] / max(live, 1)
    return out


def _tie_summary(tie_notes: List[str], steps: int) -> List[str]:
    """The report's tie notes of a gradual run: the first step's, and the last one's when
    it differs (every step's would repeat one warning up to ``steps`` times)."""
    if not tie_notes:
        return []
    out = [f"{tie_notes[0]} (first of {len(tie_notes)} of {steps} steps with ties)"]
    if tie_notes[-1] != tie_notes[0]:
        out.append(f"at the last scored step: {tie_notes[-1]}")
    return out


def select_gradually(dense: Analysis, crit: Criterion, gradual: Gradual, budget: Budget,
                     batch_list, loss, options, dense_cost, max_layer_sparsity, ignore,
                     normalize, notes: List[str], progress: bool, cost_aware: bool = False,
                     fill: bool = False, round_to: int = 1
                     ) -> Tuple[Dict[str, List[int]], Optional[Saliency]]:
    """The plan of ``gradual.steps`` mask-based steps to ``budget`` and the saliency of
    the last scored step (of the final masked model when no step needed pruning);
    ``cost_aware``: every step ranks by score ÷ one channel's saving; ``fill``: the
    final plan gives back the slack below the budget; ``round_to``: kept
    widths in multiples of that many indices at every step."""
    groups = [g for g in dense.groups if g.prunable and not ignored(g, ignore)]
    caps = removable_counts(groups, max_layer_sparsity)
    last: dict = {}  # "sal": the last step's saliency; "checked": after the first check
    tie_notes: List[str] = []   # one per scored step that has tied groups
    reference: dict = {}        # the dense scoring copy, made once if a criterion asks

    def dense_reference() -> torch.nn.Module:
        if "module" not in reference:
            reference["module"] = make_scoring_copy(dense.gm)
        return reference["module"]

    def score(masked: Analysis, kept):
        # the masked module is a fresh copy of ours: scored in place (one copy per step)
        sal = score_analysis(masked, crit, batch_list, loss, options, progress, owned=True,
                             reference=dense_reference)
        last["sal"] = sal
        scores = sal.groups
        if gradual.layer_mean:
            scores = layer_means(groups, sal.parameters, scores, kept)
        # tie-break keys of the masked model: removed slices are zero, so the kept
        # channels' weight norms are those of the slim model
        return scores, weight_norms(groups, masked.gm)

    def check(compact, scores, step_caps):
        # the stationary-loss check (one extra forward) concerns the dense model: first
        # scored step only; the tie checks run at every step
        ctx = last["sal"].context if "checked" not in last else None
        tie_notes.extend(check_scores(crit.name, scores, compact, step_caps, ctx,
                                      warn=not tie_notes))
        last["checked"] = True

    measure = getattr(dense_cost, budget.spec.cost)   # passes/budget.py's BUDGETS table
    total = getattr(dense_cost, budget.spec.dense_total)
    inputs = None if gradual.repair in (None, "auto") else \
        [cast_batch(batch, dense.gm)[0] for batch in batch_list]
    if inputs is not None:
        notes.append(f"gradual steps scored the plan so far as repair={gradual.repair!r} "
                     "leaves it (one rewrite and repair per step)")
    kept = prune_gradually(dense, groups, budget, gradual, score,
                           lambda plan: measure(dense.keep_mask(plan)), total, caps,
                           max_layer_sparsity, normalize=normalize, check=check, inputs=inputs,
                           cost_aware=cost_aware, fill=fill, round_to=round_to)
    notes.extend(_tie_summary(tie_notes, gradual.steps))
    if "sal" not in last:
        log.info("the budget holds without pruning: scoring the model once for the report")
        last["sal"] = score_analysis(step_analysis(dense, kept, gradual, inputs), crit,
                                     batch_list, loss, options, progress)
    return kept, last["sal"]
