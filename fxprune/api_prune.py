"""Public pruning API: ``fxprune.compile`` and ``fxprune.apply_plan`` (design §2, §6, §7).

``compile`` runs the whole pipeline on copies of the model, as the stage list of
:mod:`fxprune.pipeline`: trace -> analyse -> score -> select (budget) -> rewrite ->
verify -> repair -> count. The input model's parameters, buffers and train/eval flag
are untouched by every call.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch

from . import pipeline as stage
from .api_gradual import check_gradual
from .api_score import show_progress
from .api_unstructured import compile_unstructured
from .criteria import (AUTO_CRITERION, check_options, get_criterion, keywords_of,
                       resolve_criterion)
from .errors import BudgetError, DataError, FxpruneError, PlanError
from .ignore import resolve_ignore
from .plan import Plan
from .ranking import cost_budget_blocker, resolve_ranking
from .passes.budget import budget_steps
from .passes.repair import REPAIR_MODES
from .passes.rewrite import rewrite
from .passes.score import example_input_tuple, prepare_batches, wrap_loss
from .passes.frontend import capture, check_model
from .passes.input_spec import inputs_from_spec
from .passes.gradual import as_gradual, resolve_step_repair
from .passes.trace import as_input_tuple
from .passes.groups import analyze
from .passes.verify import slim_shapes
from .passes.widths import check_round_to
from .report import CompileResult

__all__ = ["compile", "apply_plan", "resolve_repair", "resolve_criterion", "AUTO_CRITERION"]

log = logging.getLogger(__name__)


def compile(model: torch.nn.Module, criterion: str = "auto", example_inputs: Any = None,
            data: Any = None, *, flops=None, params=None, sparsity=None, latency=None,
            loss_fn: Optional[Callable] = None, batches: Optional[int] = None,
            max_layer_sparsity: float = 0.95, ignore: Sequence[str] = (),
            unstructured: bool = False, between_steps: Optional[Callable] = None,
            output_fn: Optional[Callable] = None, verify: bool = True,
            measure_latency: bool = False, progress: Optional[bool] = None,
            normalize: Optional[str] = "auto", leaf_modules=(), concrete_args=None,
            repair: Optional[str] = "auto", round_to: int = 1, frontend: str = "auto",
            steps=None, uniform: bool = False, cost_aware="auto", fill: bool = False,
            **options) -> CompileResult:
    """Prune ``model`` to a budget and return a physically slimmed GraphModule.

    ``criterion``: a name of :func:`fxprune.list_criteria`, or ``"auto"`` (default):
    ``"obs"`` when ``data`` is given and the pruning is structured, else ``"l2"``
    (:data:`AUTO_CRITERION`, chosen by the quality benchmark).
    Exactly one budget: ``flops=r`` / ``params=r`` (kept fraction of the dense count;
    a decreasing list runs iterative pruning, re-scoring between steps and calling
    ``between_steps(module, step)``), ``latency=r`` (kept fraction of the dense latency
    on the model's device, predicted by a per-layer latency table timed there:
    :mod:`fxprune.passes.latency_table`) or ``sparsity=r`` (remove ``floor(r*size)``
    channels of every group); the kinds are :data:`fxprune.passes.budget.BUDGETS`.
    ``measure_latency=True`` times the dense and the slim model for the report.
    ``unstructured=True`` with ``sparsity=r`` masks weights.
    ``normalize``: ``"mean"`` ranks channels globally by score ÷ their group's mean
    |score|, ``"max"`` by score ÷ the group's maximum (design §5.5), ``None`` by raw
    score magnitude; ``cost_aware=True`` divides that by the budget's cost (FLOPs,
    parameters or latency) one channel of the group saves, the greedy answer to "least
    importance lost per cost saved" (:mod:`fxprune.passes.unit_cost`; with ``steps=``, at
    every step, on the plan so far). ``"auto"``
    (default of both, :mod:`fxprune.ranking`): a criterion's own ranking where it declares
    one and it applies (flops/params/latency pruning by the global order:
    ``Criterion.ranking`` one-shot, ``Criterion.step_ranking`` with ``steps=``), else
    ``"mean"`` without costs. No built-in declares a one-shot ranking; obs declares
    ``normalize=None, cost_aware=True`` for gradual steps. One-shot, that ranking of obs
    kept more accuracy after fine-tuning in the quality benchmark (and less post-training
    on a real LeNet-5: benchmarks/quality/RESULTS.md).
    ``steps=N`` (or a :class:`fxprune.Gradual`, which adds the OBA reference code's
    scoring conditions): prune gradually in N steps on an exponential schedule to the one
    flops/params budget, re-scoring the masked model after each step with no fine-tuning
    in between, then rewrite once (:mod:`fxprune.passes.gradual`). Each step scores the
    plan so far as ``repair=`` leaves it (``Gradual(repair="auto")``, the default: one
    rewrite and repair per step; ``Gradual(N, repair=None)`` scores the masked dense
    weights, the paper's procedure).
    ``repair``: after each verified rewrite, ``"full"`` re-estimates batch-norm statistics
    and re-fits every layer that lost input channels to the dense model's outputs on the
    calibration inputs, ``"bn"`` only re-estimates batch norms, ``None`` leaves the slim
    model as the rewrite made it (design §7b). ``"auto"`` (default): ``"full"`` when
    ``data`` is given, else ``None``. The report's ``repair`` says what it did.
    ``round_to=N``: every group that loses channels keeps a multiple of N tensor
    indices (a head of d dims counts d), for fast kernels; the budget is still met.
    ``fill=True`` (flops/params/latency by the global order): once the budget holds, give
    back removed channels, most important first, while it still holds -- the last
    removal can be a whole head that lands well below the target
    (:mod:`fxprune.passes.fill`; with ``steps=`` or a list of targets, on the final plan).
    ``uniform=True``: a flops/params budget is met by removing the same fraction of
    every group (as ``sparsity=r`` does), so that every layer keeps the same number of
    heads and MLP units -- what :func:`fxprune.save_pretrained` needs to write a Hugging
    Face config.
    ``frontend``: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, ATen graph)
    or ``"auto"`` (default: export only where symbolic tracing fails); the report's
    ``frontend`` says which was used.
    """
    check_model(model)  # before anything reads it (ignore=, the loss, the inputs)
    budget_given = dict(flops=flops, params=params, sparsity=sparsity,
                        latency=_latency_budget(latency))
    criterion = resolve_criterion(criterion, data is not None, unstructured)
    crit = get_criterion(criterion)
    check_options(crit, options, keywords_of(compile), "compile")
    normalize, cost_aware = resolve_ranking(  # before scoring, which can take minutes
        crit, normalize, cost_aware, steps=steps, uniform=uniform, unstructured=unstructured,
        sparsity=sparsity)
    batch_list = prepare_batches(data, batches, crit.needs_data)
    state = stage.PruneState(
        model=model, crit=crit, inputs=example_input_tuple(example_inputs, batch_list, model),
        batches=batch_list, loss=wrap_loss(loss_fn, output_fn, model), options=dict(options),
        trace_kw=dict(leaf_modules=leaf_modules, concrete_args=concrete_args, frontend=frontend),
        ignore=resolve_ignore(model, ignore), normalize=normalize,
        max_layer_sparsity=max_layer_sparsity, verify=_check_verify(verify),
        progress=show_progress(progress),
        repair_mode=resolve_repair(repair, batch_list, unstructured),
        round_to=check_round_to(round_to), uniform=_check_uniform(uniform, steps, unstructured),
        cost_aware=cost_aware, fill=_check_fill(fill, uniform, sparsity, unstructured))
    if unstructured:
        if sparsity is None or any(v is not None for k, v in budget_given.items()
                                   if k != "sparsity"):
            raise BudgetError("unstructured pruning takes sparsity=r only")
        return compile_unstructured(state, sparsity)
    budgets = budget_steps(**budget_given)
    gradual = resolve_step_repair(as_gradual(steps), state.repair_mode)
    check_gradual(gradual, budgets, between_steps, crit, batch_list is not None)
    _warn_obs_unrepaired(crit, state.repair_mode)
    for step, budget in enumerate(budgets):
        stage.analyse(state)
        if gradual is None:
            stage.score(state, step, len(budgets))
            stage.select(state, budget, final=step == len(budgets) - 1)
        else:  # mask-based steps on the dense graph, one rewrite
            stage.select_gradually(state, gradual, budget)
        stage.rewrite_and_verify(state)
        stage.repair(state)
        stage.record_step(state)
        if between_steps is not None:
            between_steps(state.current, step)
    return stage.finish(state, budgets, criterion, measure_latency)


def _latency_budget(latency):
    """``latency=`` is the latency budget; a bool is the old name of measure_latency."""
    if isinstance(latency, bool):
        raise BudgetError(f"latency={latency} is a budget now (latency=0.5 keeps half the "
                          "dense latency): to time dense and slim for the report pass "
                          f"measure_latency={latency}")
    return latency


def _check_verify(verify) -> bool:
    """``verify`` must be a bool: ``verify="false"`` would be true and verify."""
    if not isinstance(verify, bool):
        raise FxpruneError(f"verify={verify!r} must be True or False")
    return verify


def _check_uniform(uniform, steps, unstructured: bool) -> bool:
    if not isinstance(uniform, bool):
        raise BudgetError(f"uniform={uniform!r} must be True or False")
    if uniform and (steps is not None or unstructured):
        raise BudgetError("uniform=True ranks channels within each group for one global "
                          "sparsity; it does not combine with steps= or unstructured=True")
    return uniform


def _check_fill(fill, uniform: bool, sparsity, unstructured: bool) -> bool:
    if not isinstance(fill, bool):
        raise BudgetError(f"fill={fill!r} must be True or False")
    blocker = cost_budget_blocker("fill", uniform, unstructured, sparsity) if fill else None
    if blocker is not None:
        raise BudgetError(blocker)
    return fill


def _warn_obs_unrepaired(crit, repair_mode: Optional[str]) -> None:
    if crit.name == "obs":  # its scores assume repair='full''s least-squares compensation
        from .criteria.obs import warn_unless_repaired
        warn_unless_repaired(repair_mode)


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


def apply_plan(model: torch.nn.Module, plan: Plan, example_inputs: Any = None, *,
               data: Any = None, batches: Optional[int] = None,
               repair: Optional[str] = "auto", verify: bool = True, leaf_modules=(),
               concrete_args=None, frontend: str = "auto") -> CompileResult:
    """Replay a saved plan on a fresh copy of the same model. With calibration ``data``
    the slim model is repaired after verification, as :func:`compile` repairs it
    (``repair="auto"``: ``"full"`` with data, else nothing). Without ``example_inputs``
    (and ``data``) the inputs are rebuilt from the plan's record of the compile's
    example inputs (:mod:`fxprune.passes.input_spec`): keyword names and constants,
    shapes, dtypes; token ids within the recorded range, 0/1 masks as ones."""
    check_model(model)
    if not isinstance(plan, Plan):
        raise PlanError(f"apply_plan takes a fxprune Plan (result.plan, or "
                        f"fxprune.Plan.from_json(path)), not {type(plan).__name__}")
    plan = plan.normalized()  # kept lists written after construction are checked too
    _check_verify(verify)
    batch_list = prepare_batches(data, batches, False)
    repair_mode = resolve_repair(repair, batch_list, False)
    if example_inputs is None and batch_list is None:
        example_inputs = _inputs_of_plan(model, plan)
    inputs = example_input_tuple(example_inputs, batch_list, model)
    analysis = analyze(capture(model, inputs, leaf_modules=leaf_modules,
                               concrete_args=concrete_args, frontend=frontend))
    stage.check_plan_fits(analysis, plan, model, inputs)
    slim = rewrite(analysis, plan.kept)
    slim_shapes(slim, inputs)
    report = stage.build_report(analysis, slim, plan, inputs, verify, False)
    report.repair = stage.repair_slim(analysis, slim, plan.kept, batch_list, repair_mode)
    return CompileResult(slim, plan, report)


def _inputs_of_plan(model: torch.nn.Module, plan: Plan):
    """Example inputs rebuilt from what the plan records (:mod:`fxprune.passes.input_spec`:
    keyword names, dtypes, shapes, integer ranges); plans from before that record have
    their input shapes only, rebuilt as zeros of the model's dtype."""
    spec = plan.meta.get("inputs")
    if isinstance(spec, dict):
        return inputs_from_spec(model, spec)
    shapes = plan.meta.get("input_shapes")
    if not shapes:
        raise FxpruneError("pass example_inputs: this plan does not record input shapes")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return as_input_tuple(tuple(torch.zeros(s, dtype=dtype) for s in shapes))
