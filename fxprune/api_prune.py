"""Public pruning API: ``fxprune.compile`` and ``fxprune.apply_plan`` (design §2, §6, §7).

``compile`` runs the whole pipeline on copies of the model: trace -> analyse ->
score -> select (budget) -> rewrite -> verify -> count. The input model's
parameters, buffers and train/eval flag are untouched by every call.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .api_score import (_progress, check_not_empty, prepare_batches, resolve_example_inputs,
                        score_analysis, wrap_loss)
from .criteria import check_options, get_criterion, keywords_of
from .criteria.aggregate import weight_norms
from .criteria.scoring import cast_batch
from .degenerate import check_scores
from .errors import BudgetError, DataError, FxpruneError, PlanError, TraceError
from .ignore import ignored as _ignored
from .ignore import resolve_ignore
from .plan import Plan, fingerprint, fingerprint_differences
from .passes.count import cost_model, count_flops, count_params
from .passes.groups import Analysis, analyze
from .passes.repair import REPAIR_MODES
from .passes.repair import repair as repair_pass
from .passes.rewrite import rewrite
from .passes.select import (DEFAULT_NORMALIZE, Budget, check_normalize, member_spans,
                            removable_counts, select_budget, select_uniform)
from .passes.shape_prop import propagate_shapes
from .passes.trace import as_input_tuple, trace
from .passes.verify import check, masked_reference, tolerance
from .report import CompileResult, GroupRow, Report, measure_latency
from .unstructured import compile_unstructured

log = logging.getLogger(__name__)


def compile(model: torch.nn.Module, criterion: str = "l2", example_inputs: Any = None,
            data: Any = None, *, flops=None, params=None, sparsity=None,
            loss_fn: Optional[Callable] = None, batches: Optional[int] = None,
            max_layer_sparsity: float = 0.95, ignore: Sequence[str] = (),
            unstructured: bool = False, between_steps: Optional[Callable] = None,
            output_fn: Optional[Callable] = None, verify: bool = True,
            latency: bool = False, progress: Optional[bool] = None,
            normalize: Optional[str] = DEFAULT_NORMALIZE, leaf_modules=(), concrete_args=None,
            repair: Optional[str] = "auto", **options) -> CompileResult:
    """Prune ``model`` to a budget and return a physically slimmed GraphModule.

    Exactly one budget: ``flops=r`` / ``params=r`` (kept fraction of the dense count;
    a decreasing list runs iterative pruning, re-scoring between steps and calling
    ``between_steps(module, step)``) or ``sparsity=r`` (remove ``floor(r*size)``
    channels of every group). ``unstructured=True`` with ``sparsity=r`` masks weights.
    ``normalize``: ``"mean"`` (default) ranks channels globally by score ÷ their group's
    mean |score|, ``"max"`` by score ÷ the group's maximum (design §5.5), ``None`` by raw
    score magnitude. "mean" is the default because it kept more accuracy than "max" for
    both OBA and l2 in the quality benchmark (benchmarks/quality/RESULTS.md): a group
    with one outlier score no longer loses all its other channels first.
    ``repair``: after each verified rewrite, ``"full"`` re-estimates batch-norm statistics
    and re-fits every layer that lost input channels to the dense model's outputs on the
    calibration inputs, ``"bn"`` only re-estimates batch norms, ``None`` leaves the slim
    model as the rewrite made it (design §7b). ``"auto"`` (default): ``"full"`` when
    ``data`` is given, else ``None``. The report's ``repair`` says what it did.
    """
    crit = get_criterion(criterion)
    check_options(crit, options, keywords_of(compile), "compile")
    ignore = resolve_ignore(model, ignore)
    check_normalize(normalize)  # before scoring, which can take minutes
    batch_list = prepare_batches(data, batches, crit.needs_data)
    example_inputs = resolve_example_inputs(example_inputs, batch_list, model)
    inputs = as_input_tuple(example_inputs)
    check_not_empty(inputs)
    loss = wrap_loss(loss_fn, output_fn)
    repair_mode = resolve_repair(repair, batch_list, unstructured)
    if crit.name == "obs":  # its scores assume repair='full''s least-squares compensation
        from .criteria.obs import warn_unless_repaired
        warn_unless_repaired(repair_mode)
    trace_kw = dict(leaf_modules=leaf_modules, concrete_args=concrete_args)
    if unstructured:
        if sparsity is None or flops is not None or params is not None:
            raise BudgetError("unstructured pruning takes sparsity=r only")
        return compile_unstructured(model, crit, inputs, batch_list, loss, sparsity,
                                    options, _progress(progress), trace_kw)
    steps = _budget_steps(flops, params, sparsity)
    dense = refuse_broken_ties(analyze(trace(model, inputs, **trace_kw)))
    dense_cost = cost_model(dense, inputs)
    current, analysis, plan_kept, errors = model, dense, None, []
    notes: List[str] = []  # tied-score warnings of every step, for report.notes
    for step, budget in enumerate(steps):
        if step:
            analysis = refuse_broken_ties(analyze(trace(current, inputs, **trace_kw)))
        log.info("scoring with %s (step %d/%d)", crit.name, step + 1, len(steps))
        sal = score_analysis(analysis, crit, batch_list, loss, options, _progress(progress))
        log.info("pruning to %s=%s", budget.kind, budget.ratio)
        kept = _select(analysis, sal, budget, dense, dense_cost, plan_kept, inputs,
                       max_layer_sparsity, ignore, normalize, notes)
        slim = rewrite(analysis, kept)
        slim_shapes(slim, inputs)
        if verify:  # per step: between_steps may fine-tune, so only this step's input is the reference
            errors.append(verify_rewrite(analysis, slim, kept, inputs))
        repaired = repair_slim(analysis, slim, kept, batch_list, repair_mode)
        plan_kept = _compose(plan_kept, kept)
        if between_steps is not None:
            between_steps(slim, step)
        current = slim
    plan = Plan(plan_kept, {g.id: g.size for g in dense.groups if g.id in plan_kept},
                {"criterion": criterion, "budget": [b.__dict__ for b in steps],
                 "input_shapes": [list(x.shape) for x in inputs if torch.is_tensor(x)],
                 "fingerprint": dense_fingerprint(dense, model, inputs)})
    report = build_report(dense, current, plan, inputs, False, latency,
                          predicted=dense_cost.flops(dense.keep_mask(plan.kept)))
    report.max_rel_error = max(errors) if errors else None
    report.notes.extend(dict.fromkeys(notes))
    report.repair = repaired
    _note_shortfall(report, steps[-1])
    return CompileResult(current, plan, report, saliency=sal)


def slim_shapes(slim: torch.fx.GraphModule, inputs) -> None:
    """Shape propagation of the rewritten model. The dense model already ran on these
    inputs, so a failure here is the rewrite's, not the user's inputs'."""
    try:
        propagate_shapes(slim, inputs)
    except TraceError as exc:
        raise FxpruneError(f"the slim model fails on the example inputs that the dense model "
                           f"runs on ({exc.__cause__ or exc}): a rewrite bug; please report this "
                           "model (and prune around it meanwhile with ignore=[...])") from exc


def resolve_repair(repair: Optional[str], batch_list, unstructured: bool) -> Optional[str]:
    """The repair mode to run: ``"auto"`` is ``"full"`` with calibration data, else None."""
    if repair == "auto":
        return "full" if batch_list is not None and not unstructured else None
    if repair not in REPAIR_MODES:
        raise FxpruneError(f"repair={repair!r}: use 'full' (BN re-estimation and least-squares "
                           "re-fit), 'bn' (BN re-estimation only), None or 'auto'")
    if repair is not None and unstructured:
        raise FxpruneError("repair applies to structured pruning; pass repair=None with "
                           "unstructured=True")
    if repair is not None and batch_list is None:
        raise DataError(f"repair={repair!r} needs calibration data: pass data=<iterable of "
                        "(inputs, targets) batches>, or repair=None")
    return repair


def repair_slim(analysis: Analysis, slim: torch.fx.GraphModule, kept, batch_list,
                mode: Optional[str]):
    """Run the repair pass on ``slim`` with the calibration batches' inputs, moved and
    cast to the model's device and floating dtype as scoring casts them."""
    if mode is None:
        return None
    inputs = [cast_batch(batch, slim)[0] for batch in batch_list]
    log.info("repairing the slim model (%s) on %d calibration batches", mode, len(inputs))
    return repair_pass(analysis.gm, slim, analysis, kept, inputs, mode)


def _note_shortfall(report: Report, budget: Budget) -> None:
    """Say why the achieved ratio is well below the target: channel units are coarse."""
    if budget.kind == "sparsity":
        return
    achieved = report.flops_ratio if budget.kind == "flops" else report.params_ratio
    if budget.ratio - achieved > 0.02:
        report.notes.append(
            f"{budget.kind}: kept {achieved:.3f} for a target of {budget.ratio}: channel "
            "granularity - removing the next lowest-ranked unit (a whole head, conv group "
            "or channel of a small layer) overshoots the budget")


def _budget_steps(flops, params, sparsity) -> List[Budget]:
    if isinstance(flops, (list, tuple)) or isinstance(params, (list, tuple)):
        kind, values = ("flops", flops) if flops is not None else ("params", params)
        if sparsity is not None or (flops is not None and params is not None):
            raise BudgetError("give exactly one budget: flops=r, params=r or sparsity=r")
        if not values or any(b >= a for a, b in zip(values, values[1:])):
            raise BudgetError(f"iterative {kind} budgets must be a non-empty, strictly "
                              f"decreasing list (got {values})")
        return [Budget.parse(**{kind: v}) for v in values]
    return [Budget.parse(flops=flops, params=params, sparsity=sparsity)]


def _select(analysis: Analysis, sal, budget: Budget, dense: Analysis, dense_cost, plan_kept,
            inputs, max_layer_sparsity, ignore, normalize, notes) -> Dict[str, List[int]]:
    groups = [g for g in analysis.groups if g.prunable and not _ignored(g, ignore)]
    caps = removable_counts(groups, max_layer_sparsity)
    if plan_kept is not None:  # iterative: the cap is relative to the dense size
        dense_sizes = {g.id: g.size for g in dense.groups}
        for g in groups:
            already = dense_sizes.get(g.id, g.size) - g.size
            caps[g.id] = max(0, min(caps[g.id], math.floor(max_layer_sparsity * dense_sizes.get(g.id, g.size)) - already))
    # all-zero / all-equal scores: an error when no group can be ranked, else a note;
    # ties are broken by the channels' weight norms (design §5.5)
    notes.extend(check_scores(sal.criterion, sal.groups, groups, caps,
                              getattr(sal, "context", None)))
    tiebreak = weight_norms(groups, analysis.gm)
    if budget.kind == "sparsity":
        return select_uniform(groups, sal.groups, budget.ratio, caps, tiebreak=tiebreak)
    cost_now = dense_cost if analysis is dense else cost_model(analysis, inputs)
    measure = cost_now.flops if budget.kind == "flops" else cost_now.params
    dense_total = dense_cost.dense_flops if budget.kind == "flops" else dense_cost.dense_params
    order = None
    crit = get_criterion(sal.criterion)
    if crit.select is not None:
        order = crit.select(groups, sal.groups, sal.context, caps)
    return select_budget(groups, sal.groups, budget, caps,
                         lambda kept: measure(analysis.keep_mask(kept)), dense_total, order,
                         normalize, tiebreak=tiebreak)


def dense_fingerprint(dense: Analysis, model: torch.nn.Module, inputs) -> Dict[str, Any]:
    """The plan fingerprint (:func:`fxprune.plan.fingerprint`) of a dense analysis."""
    shapes = [list(x.shape) for x in inputs if torch.is_tensor(x)]
    return fingerprint(dense.groups, type(model).__name__, shapes)


def _compose(previous: Optional[Dict[str, List[int]]], kept: Dict[str, List[int]]):
    """Express this step's kept indices in the dense model's channel numbering."""
    if previous is None:
        return {g: sorted(k) for g, k in kept.items()}
    out = dict(previous)
    for gid, chans in kept.items():
        base = previous.get(gid)
        out[gid] = sorted(base[c] for c in chans) if base is not None else sorted(chans)
    return out


def counting_inputs(modules, inputs) -> Tuple[tuple, int]:
    """The inputs (and their batch size) the report counts FLOPs and latency on: one
    example, as the CLI does; the whole batch when one of ``modules`` fails on one."""
    n = next((int(x.shape[0]) for x in inputs if torch.is_tensor(x) and x.dim() > 0), 1)
    one = tuple(x[:1] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n else x
                for x in inputs)
    if n <= 1:
        return inputs, n
    try:
        for module in modules:
            count_flops(module, one)
    except Exception as exc:  # noqa: BLE001 - batch-dependent code: count the batch instead
        log.info("counting FLOPs on the whole batch of %d: one example fails (%s)", n, exc)
        return inputs, n
    return one, 1


def build_report(dense: Analysis, slim: torch.fx.GraphModule, plan: Plan, inputs, verify: bool,
                 latency: bool, predicted: Optional[float] = None) -> Report:
    """The report: FLOPs and latency per example, the verification on all ``inputs``."""
    sample, batch = counting_inputs((dense.gm, slim), inputs)
    before = count_flops(dense.gm, sample)
    if predicted is not None and sample is not inputs:  # the cost model counts the batch
        predicted *= before / max(count_flops(dense.gm, inputs), 1)
    report = Report(before, count_flops(slim, sample), count_params(dense.gm), count_params(slim), predicted_flops=predicted)
    if batch > 1:
        report.notes.append(f"FLOPs and latency are for the whole batch of {batch} examples "
                            "(the model does not run on one example)")
    for g in dense.groups:
        kept = len(plan.kept.get(g.id, range(g.size)))
        report.groups.append(GroupRow(g.id, g.kind, g.size, kept, g.prunable, g.reason))
    if verify:
        report.max_rel_error = verify_rewrite(dense, slim, plan.kept, inputs)
    if latency:
        timed = measure_latency(dense.gm, slim, sample)
        report.latency_before_ms, report.latency_after_ms = timed["before_ms"], timed["after_ms"]
        report.latency_speedup_range = timed["speedup_range"]
    return report


def verify_rewrite(analysis: Analysis, slim: torch.nn.Module, kept: Dict[str, List[int]],
                   inputs) -> float:
    """Masked-equivalence oracle (design §7): ``slim`` must compute what ``analysis.gm``
    computes with the removed channels masked. Returns the relative error; raises
    ``FxpruneError`` when it is above the dtype's tolerance or not finite."""
    log.info("verifying against the masked reference")
    error = check(slim, masked_reference(analysis, kept), inputs)
    if not math.isfinite(error):
        raise FxpruneError("verification failed: the model's output on the example "
                           "inputs is not finite (NaN or inf), so the slim model cannot "
                           "be checked; check the inputs and the model's weights")
    if error > tolerance(slim):
        raise FxpruneError(f"verification failed: slim model differs from the masked "
                           f"reference by {error:.3e} (relative); please report this model")
    return error


def apply_plan(model: torch.nn.Module, plan: Plan, example_inputs: Any = None, *,
               data: Any = None, batches: Optional[int] = None,
               repair: Optional[str] = "auto", verify: bool = True, leaf_modules=(),
               concrete_args=None) -> CompileResult:
    """Replay a saved plan on a fresh copy of the same model. With calibration ``data``
    the slim model is repaired after verification, as :func:`compile` repairs it
    (``repair="auto"``: ``"full"`` with data, else nothing)."""
    batch_list = prepare_batches(data, batches, False)
    repair_mode = resolve_repair(repair, batch_list, False)
    if example_inputs is None and batch_list is not None:
        example_inputs = resolve_example_inputs(None, batch_list, model)
    if example_inputs is None:
        shapes = plan.meta.get("input_shapes")
        if not shapes:
            raise FxpruneError("pass example_inputs: this plan does not record input shapes")
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        example_inputs = tuple(torch.zeros(s, dtype=dtype) for s in shapes)
    inputs = as_input_tuple(example_inputs)
    check_not_empty(inputs)
    analysis = refuse_broken_ties(
        analyze(trace(model, inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)))
    _check_plan(analysis, plan, dense_fingerprint(analysis, model, inputs))
    slim = rewrite(analysis, plan.kept)
    slim_shapes(slim, inputs)
    report = build_report(analysis, slim, plan, inputs, verify, False)
    report.repair = repair_slim(analysis, slim, plan.kept, batch_list, repair_mode)
    return CompileResult(slim, plan, report)


def _emptied_members(group, kept: set) -> List[str]:
    """Members of ``group`` that would lose every index under ``kept`` (a conv with
    zero output or input channels cannot run)."""
    out = []
    for span in member_spans(group):
        if not span & kept:
            names = sorted({f"`{m.target}` (dim {m.dim})" for m in group.members
                            if frozenset(c for c, ix in enumerate(m.index_map) if ix) == span})
            out.append(f"group {group.id!r}: the plan removes all of channels {sorted(span)}, "
                       f"every index of {', '.join(names[:3])}; keep at least one of them")
    return out


def refuse_broken_ties(analysis: Analysis) -> Analysis:
    """Tied tensors (one parameter or buffer reachable under several names) must lose
    the same slices under every name. Where the analysis does not tie them (it keys
    tensors by name), the groups they touch are marked unprunable with the reason,
    so they are never pruned inconsistently. Returns ``analysis``."""
    gm = analysis.gm
    slots: Dict[int, List[tuple]] = {}
    for kind in ("named_parameters", "named_buffers"):
        for name, t in getattr(gm, kind)(remove_duplicate=False):
            prefix, _, attr = name.rpartition(".")
            owner = gm.get_submodule(prefix) if prefix else gm
            slots.setdefault(id(t), []).append((name, id(owner), attr))
    records: Dict[str, list] = {}
    for (target, _dim), rec in analysis.space.records.items():
        records.setdefault(target, []).append(rec)
    for aliases in slots.values():
        if len({(owner, attr) for _, owner, attr in aliases}) < 2:
            continue  # one module slot reached by several paths: sliced once, still tied
        names = sorted({name for name, _, _ in aliases})
        if _ties_consistent(analysis, [records.get(n, []) for n in names]):
            continue
        touched = set()
        for n in names:
            for rec in records.get(n, []):
                gids = analysis.element_group[rec.ids]
                touched.update(int(g) for g in gids[gids >= 0])
        reason = (f"`{names[0]}` is tied to `{names[1]}` (one tensor under several names) "
                  "and the analysis does not couple the two uses; tied tensors are kept whole")
        for gi in sorted(touched):
            group = analysis.groups[gi]
            if group.prunable:
                group.prunable, group.reason = False, reason
                log.info("group %s: %s", group.id, reason)
    return analysis


def _ties_consistent(analysis: Analysis, recs_per_name) -> bool:
    """Do all aliases carry the same records, channel for channel?"""
    def signature(recs):
        return sorted((r.dim, tuple(analysis.element_group[r.ids].tolist()),
                       tuple(analysis.element_channel[r.ids].tolist())) for r in recs)
    first = signature(recs_per_name[0])
    return all(signature(r) == first for r in recs_per_name[1:])


def _check_plan(analysis: Analysis, plan: Plan, here: Dict[str, Any]) -> None:
    """Refuse a plan that does not fit this model: made on another architecture (its
    fingerprint differs from ``here``, this model's), or whose kept lists do not fit
    the groups (unknown, resized, unprunable, out of range, repeated or emptying)."""
    differs = fingerprint_differences(plan.meta.get("fingerprint"), here)
    if differs:
        raise PlanError("the plan does not fit this model, it was made on a different one: "
                        + "; ".join(differs)
                        + ". Apply it to the model (and input size) it was made on, or "
                        "compile a new plan for this one")
    by_id = {g.id: g for g in analysis.groups}
    problems = []
    for gid, kept in plan.kept.items():
        g = by_id.get(gid)
        if g is None:
            problems.append(f"group {gid!r} does not exist in this model")
        elif plan.sizes.get(gid, g.size) != g.size:
            problems.append(f"group {gid!r} has {g.size} channels, the plan expects {plan.sizes[gid]}")
        elif not g.prunable and len(kept) != g.size:
            problems.append(f"group {gid!r} is not prunable here ({g.reason})")
        elif not kept or min(kept) < 0 or max(kept) >= g.size:
            problems.append(f"group {gid!r}: kept indices must be 1..{g.size} channels in range")
        elif len(set(kept)) != len(kept):
            problems.append(f"group {gid!r}: kept indices repeat a channel")
        else:
            problems += _emptied_members(g, set(kept))
    if problems:
        raise PlanError("the plan does not fit this model: " + "; ".join(problems[:5]))
