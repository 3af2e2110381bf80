"""The stages of :func:`fxprune.compile`, each reading and writing one :class:`PruneState`.

``compile`` is the stage list (design §1): :func:`analyse` (front end + analysis) ->
per budget step :func:`score` -> :func:`select` -> :func:`rewrite_and_verify` ->
:func:`repair` -> :func:`record_step` -> finally :func:`finish` (plan + report). Each stage
is a thin driver over one pass of ``fxprune.passes``; the state holds what the stages
hand to each other. The user's model is only ever traced (on a copy), never changed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import api_gradual
from .criteria import Criterion
from .criteria.aggregate import weight_norms
from .criteria.scoring import cast_batch
from .errors import BudgetError
from .ignore import ignored
from .plan import Plan, check_plan, fingerprint, input_shapes
from .passes.budget import Budget
from .passes.compose import compose_step, step_limits
from .passes.count import CostModel, cost_model, count_flops, count_params
from .passes.degenerate import check_scores
from .passes.frontend import capture, frontend_notes, frontend_of
from .passes.groups import Analysis, analyze
from .passes.input_spec import input_spec
from .passes.repair import repair as repair_pass
from .passes.rewrite import rewrite
from .passes.score import Saliency, score_analysis
from .passes.select import budget_blockers, select_step, step_caps
from .passes.shape_flops import graph_flops
from .passes.shape_prop import propagate_shapes
from .passes.trace import leaf_notes
from .passes.verify import slim_shapes, verify_rewrite
from .report import CompileResult, GroupRow, Report
from .report import measure_latency as time_dense_and_slim

__all__ = ["PruneState", "analyse", "score", "select", "select_gradually",
           "rewrite_and_verify", "repair",
           "record_step", "finish", "build_report", "repair_slim", "per_example_flops"]

log = logging.getLogger(__name__)


@dataclass
class PruneState:
    """Inputs of a ``compile`` call (first block) and what its stages produce."""

    model: torch.nn.Module
    crit: Criterion
    inputs: tuple
    batches: Optional[list]
    loss: Callable
    options: Dict[str, Any]
    trace_kw: Dict[str, Any]
    ignore: Sequence[str] = ()
    normalize: Optional[str] = None
    max_layer_sparsity: float = 0.95
    repair_mode: Optional[str] = None
    verify: bool = True
    progress: bool = True
    round_to: int = 1        # kept counts are multiples of this many indices (passes/widths.py)
    uniform: bool = False    # one sparsity for every group (select_uniform_budget)
    cost_aware: bool = False  # rank by score ÷ one channel's saving (passes/unit_cost.py)
    fill: bool = False       # give back the slack below the target (passes/fill.py)
    # written by the stages
    dense: Optional[Analysis] = None          # analyse: the dense model's analysis
    dense_cost: Optional[CostModel] = None    # analyse: exact cost model of the dense model
    analysis: Optional[Analysis] = None       # the model this step prunes (dense at step 0)
    current: Optional[torch.nn.Module] = None  # the latest model (slim after a step)
    saliency: Optional[Saliency] = None       # score
    kept: Optional[Dict[str, List[int]]] = None  # select: this step's kept channels
    plan_kept: Optional[Dict[str, List[int]]] = None  # kept channels in dense numbering
    slim: Optional[torch.fx.GraphModule] = None  # rewrite_and_verify
    errors: List[float] = field(default_factory=list)  # verification error per step
    notes: List[str] = field(default_factory=list)     # tied-score warnings, for the report
    repaired: Any = None                                # repair: the last RepairSummary


def analyse(state: PruneState) -> None:
    """Trace (a copy of) the current model and analyse its groups; the first call also
    builds the dense cost model. Writes ``analysis`` (and ``dense``, ``dense_cost``)."""
    source = state.model if state.current is None else state.current
    # the dense graph reads the model's own tensors: every pass that writes works on a
    # copy of its own (passes/trace.py), so a model of W GiB compiles in about 2 W
    state.analysis = analyze(capture(source, state.inputs, share_params=True, lazy=False,
                                     **state.trace_kw))
    if state.dense is None:
        state.dense, state.current = state.analysis, state.model
        state.dense_cost = cost_model(state.dense, state.inputs)


def score(state: PruneState, step: int, n_steps: int) -> None:
    """Score ``analysis`` with the criterion. Writes ``saliency``."""
    log.info("scoring with %s (step %d/%d)", state.crit.name, step + 1, n_steps)
    state.saliency = score_analysis(state.analysis, state.crit, state.batches, state.loss,
                                    state.options, state.progress)


def select(state: PruneState, budget: Budget, final: bool = True) -> None:
    """Kept channels of this step under ``budget``: all-zero / all-equal scores are an
    error when no group can be ranked, else a note; ties are broken by weight norm
    (design §5.5). ``fill`` gives back the slack of the ``final`` step only: earlier
    targets of the iterative mode are waypoints, as ``steps=`` fills only its final plan
    (so both modes give the same plan). Writes ``kept`` (and ``notes``)."""
    log.info("pruning to %s=%s", budget.kind, budget.ratio)
    analysis, sal = state.analysis, state.saliency
    groups = [g for g in analysis.groups if g.prunable and not ignored(g, state.ignore)]
    allowance, offsets = (step_limits(state.dense, state.plan_kept, analysis,
                                      [g.id for g in groups], state.max_layer_sparsity,
                                      state.round_to)
                          if state.plan_kept is not None else (None, None))
    caps = step_caps(groups, state.max_layer_sparsity, allowance)
    state.notes.extend(check_scores(sal.criterion, sal.groups, groups, caps, sal.context))
    crit = state.crit  # the criterion the saliency came from
    order = crit.select(groups, sal.groups, sal.context, caps) if crit.select else None
    cost_now = state.dense_cost if analysis is state.dense else cost_model(analysis,
                                                                           state.inputs)
    try:
        state.kept = select_step(groups, sal.groups, budget, caps, analysis.keep_mask,
                                 cost_now, state.dense_cost, order=order,
                                 normalize=state.normalize,
                                 tiebreak=_tiebreak(sal.criterion, groups, analysis.gm),
                                 round_to=state.round_to, uniform=state.uniform,
                                 cost_aware=state.cost_aware, fill=state.fill and final,
                                 offsets=offsets)
    except BudgetError as exc:  # name what blocks the budget (the costliest fixed groups)
        spec = budget.spec
        raise BudgetError(str(exc) + budget_blockers(
            analysis.groups, [g.id for g in groups], analysis.keep_mask,
            getattr(cost_now, spec.cost), getattr(state.dense_cost, spec.dense_total),
            budget.kind)) from None


def _tiebreak(criterion: str, groups, gm) -> Optional[Dict[str, torch.Tensor]]:
    """Weight norms to break score ties; none for l2, whose ties are ties of the very
    same norms (and whose norms would be computed a second time: issue 17)."""
    return None if criterion == "l2" else weight_norms(groups, gm)


def select_gradually(state: PruneState, gradual, budget: Budget) -> None:
    """``steps=N`` in place of score + select: mask-based steps on the dense analysis
    (:mod:`fxprune.passes.gradual`). Writes ``kept``, ``saliency`` (and ``notes``)."""
    state.kept, state.saliency = api_gradual.select_gradually(
        state.dense, state.crit, gradual, budget, state.batches, state.loss, state.options,
        state.dense_cost, state.max_layer_sparsity, state.ignore, state.normalize,
        state.notes, state.progress, state.cost_aware, state.fill, state.round_to)


def rewrite_and_verify(state: PruneState) -> None:
    """Rewrite ``analysis`` to the kept channels and verify it against the masked
    reference (per step: a ``between_steps`` callback may fine-tune, so only this
    step's input is the reference). Writes ``slim`` (and ``errors``)."""
    state.slim = rewrite(state.analysis, state.kept)
    slim_shapes(state.slim, state.inputs)
    if state.verify:
        state.errors.append(verify_rewrite(state.analysis, state.slim, state.kept,
                                           state.inputs))


def repair(state: PruneState) -> None:
    """Repair the verified slim model (design §7b). Writes ``repaired``."""
    state.repaired = repair_slim(state.analysis, state.slim, state.kept, state.batches,
                                 state.repair_mode)


def repair_slim(analysis: Analysis, slim: torch.fx.GraphModule, kept, batch_list,
                mode: Optional[str]):
    """Run the repair pass on ``slim`` with the calibration batches' inputs, moved and
    cast to the model's device and floating dtype as scoring casts them."""
    if mode is None:
        return None
    inputs = [cast_batch(batch, slim)[0] for batch in batch_list]
    log.info("repairing the slim model (%s) on %d calibration batches", mode, len(inputs))
    return repair_pass(analysis.gm, slim, analysis, kept, inputs, mode)


def record_step(state: PruneState) -> None:
    """The slim model becomes the current one; this step's kept indices are expressed
    in the dense model's channel numbering. Writes ``current``, ``plan_kept``."""
    previous, kept = state.plan_kept, state.kept
    if previous is None:
        state.plan_kept = {g: sorted(k) for g, k in kept.items()}
    else:  # through the tensors: a re-analysed slim model can split a dense group
        state.plan_kept = compose_step(state.dense, previous, state.analysis, kept)
    state.current = state.slim


def finish(state: PruneState, steps: List[Budget], criterion: str, measure_latency: bool
           ) -> CompileResult:
    """The plan (with the dense model's fingerprint) and the report of the last step
    (with the latency table's prediction when a latency budget measured one)."""
    dense, inputs = state.dense, state.inputs
    plan = Plan(state.plan_kept, {g.id: g.size for g in dense.groups if g.id in state.plan_kept},
                {"criterion": criterion, "budget": [b.__dict__ for b in steps],
                 "round_to": state.round_to, "uniform": state.uniform,
                 "normalize": state.normalize, "cost_aware": state.cost_aware,
                 "fill": state.fill,
                 "input_shapes": input_shapes(inputs), "inputs": input_spec(inputs),
                 "fingerprint": fingerprint(dense.groups, type(state.model).__name__,
                                            input_shapes(inputs))})
    keep = dense.keep_mask(plan.kept)
    report = build_report(dense, state.current, plan, inputs, False, measure_latency,
                          predicted=state.dense_cost.flops(keep),
                          dense_flops=state.dense_cost.dense_flops)
    _predicted_latency(report, state.dense_cost, keep, inputs)
    report.max_rel_error = max(state.errors) if state.errors else None
    report.notes.extend(dict.fromkeys(state.notes))
    report.repair = state.repaired
    report.note_shortfall(steps[-1].kind, steps[-1].ratio, steps[-1].spec.achieved,
                          filled=state.fill)
    return CompileResult(state.current, plan, report, saliency=state.saliency)


def _predicted_latency(report: Report, cost: CostModel, keep, inputs) -> None:
    """The latency table's dense and slim prediction into ``report`` (when measured)."""
    table = cost.latency_table
    if table is None:
        return
    report.predicted_latency_before_ms = table.dense_ms
    report.predicted_latency_after_ms = table.cost(keep)
    n = next((int(x.shape[0]) for x in inputs if torch.is_tensor(x) and x.dim() > 0), 1)
    if n > 1:
        report.notes.append(f"latency est: the latency table was timed on the example "
                            f"inputs, a batch of {n}")
    if table.unreliable:
        report.notes.append("latency est: unreliable, the latency table's timing rounds "
                            "disagree for many layers (other load on the machine?); re-run "
                            "on an idle machine")


def per_example_flops(modules, inputs, known: Sequence[Optional[int]] = ()
                      ) -> Tuple[tuple, int, List[int]]:
    """FLOPs of each of ``modules`` as the report counts them: on one example, as the CLI
    does, or on the whole batch when one of them fails on one (a slim graph that keeps
    the traced batch size, e.g. Swin's window partition). Returns (the inputs counted
    on, their batch size, the counts): each module is counted once. ``known[i]``: the
    count of ``modules[i]`` on all of ``inputs`` if already made (the cost model's dense
    total), used when the report counts on all of them (a batch of one); graphs whose
    shapes were propagated on ``inputs`` are counted from those shapes (issue 17)."""
    n = next((int(x.shape[0]) for x in inputs if torch.is_tensor(x) and x.dim() > 0), 1)
    if n > 1:
        one = tuple(x[:1] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n else x
                    for x in inputs)
        try:
            return one, 1, [_count_on_one(module, one) for module in modules]
        except Exception as exc:  # noqa: BLE001 - batch-dependent code: count the batch
            log.info("counting FLOPs on the whole batch of %d: one example fails (%s)", n, exc)
    known = list(known) + [None] * (len(modules) - len(known))
    return inputs, n, [k if k is not None else _count_on(module, inputs)
                       for module, k in zip(modules, known)]


def _count_on_one(module: torch.nn.Module, one) -> int:
    """:func:`count_flops` on one example. A GraphModule is counted from its shapes
    propagated on that example (meta tensors: a fraction of a counted run on fake
    tensors, issue 17); the shapes it recorded on the batch are put back afterwards."""
    if isinstance(module, torch.fx.GraphModule):
        saved = [(node, dict(node.meta)) for node in module.graph.nodes]
        try:
            propagate_shapes(module, one)
            flops = graph_flops(module, one)
        except Exception:  # noqa: BLE001 - e.g. batch-dependent code: count it by running
            flops = None
        finally:
            for node, meta in saved:
                node.meta.clear()
                node.meta.update(meta)
        if flops is not None:
            return flops
    return count_flops(module, one)


def _count_on(module: torch.nn.Module, inputs) -> int:
    """:func:`count_flops`, from the recorded shapes where they are those of ``inputs``."""
    if isinstance(module, torch.fx.GraphModule):
        flops = graph_flops(module, inputs)
        if flops is not None:
            return flops
    return count_flops(module, inputs)


def build_report(dense: Analysis, slim: torch.fx.GraphModule, plan: Plan, inputs, verify: bool,
                 measure_latency: bool, predicted: Optional[float] = None,
                 dense_flops: Optional[int] = None) -> Report:
    """Counts per example (:func:`per_example_flops`), one row per dense group, and
    optionally the verification error on all of ``inputs`` and the latencies, dense and
    slim timed interleaved. ``predicted`` / ``dense_flops``: the cost model's prediction
    and dense total, both for the whole batch (selection counts the calibration batch)."""
    sample, batch, (before, after) = per_example_flops((dense.gm, slim), inputs,
                                                       known=(dense_flops, None))
    if predicted is not None and sample is not inputs:  # rescale the batch prediction
        total = dense_flops if dense_flops is not None else _count_on(dense.gm, inputs)
        predicted *= before / max(total, 1)
    report = Report(before, after, count_params(dense.gm),
                    count_params(slim), predicted_flops=predicted,
                    frontend=frontend_of(dense.gm))
    report.notes.extend(leaf_notes(dense.gm))  # submodules kept whole by trace's leaf retry
    report.notes.extend(frontend_notes(dense.gm))  # why torch.export was used, if it was
    if batch > 1:
        report.notes.append(f"FLOPs and latency are for the whole batch of {batch} examples "
                            "(the model does not run on one example)")
    for g in dense.groups:
        kept = len(plan.kept.get(g.id, range(g.size)))
        report.groups.append(GroupRow(g.id, g.kind, g.size, kept, g.prunable, g.reason))
    if verify:
        report.max_rel_error = verify_rewrite(dense, slim, plan.kept, inputs)
    if measure_latency:
        timed = time_dense_and_slim(dense.gm, slim, sample)
        report.latency_before_ms, report.latency_after_ms = timed["before_ms"], timed["after_ms"]
        report.latency_speedup_range = timed["speedup_range"]
    return report


def check_plan_fits(analysis: Analysis, plan: Plan, model: torch.nn.Module, inputs) -> None:
    """:func:`fxprune.plan.check_plan` against this model's dense fingerprint."""
    here = fingerprint(analysis.groups, type(model).__name__, input_shapes(inputs))
    check_plan(analysis.groups, plan, here)
