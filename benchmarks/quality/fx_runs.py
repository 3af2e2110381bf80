"""One pruning job with fxprune (one-shot or iterative): prune, measure, fine-tune, measure."""
from __future__ import annotations

import dataclasses
import time
import traceback
from typing import Dict, List

import torch

import fxprune

from .config import method_options
from .nets import accuracy_after_bn_recalibration, evaluate, log, train


def _finetune(module: torch.nn.Module, ctx, seed: int, steps=None) -> None:
    """The shared fine-tuning recipe (same for every criterion of a model), in place."""
    from .data import train_batches
    r = ctx.ft_recipe if steps is None else dataclasses.replace(ctx.ft_recipe, steps=steps)
    xtr, ytr = ctx.train_data
    train(module, r, train_batches(xtr, ytr, r.batch, r.steps, 1000 + seed, r.aug))


def _error_record(exc: BaseException) -> Dict:
    msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    log(f"  ERROR {msg[:300]}")
    traceback.print_exc()
    return {"error": msg[:500]}


def fx_job(model: torch.nn.Module, criterion: str, budget: float, seed: int, ctx,
           repair: str = "none") -> Dict:
    """One-shot ``fxprune.compile`` to ``flops=budget`` (with the repair pass ``repair``),
    then the shared fine-tuning."""
    criterion, opts = method_options(criterion, seed)
    if criterion not in fxprune.list_criteria():
        return {"error": f"criterion {criterion!r} is not registered in this fxprune "
                         f"(have {sorted(fxprune.list_criteria())})", "skipped": True}
    calib = ctx.calib[seed]
    torch.manual_seed(seed)
    try:
        t0 = time.time()
        res = fxprune.compile(model, criterion, example_inputs=calib[0][0][:2], data=calib,
                              flops=budget, batches=len(calib), progress=False, verify=True,
                              repair=None if repair == "none" else repair, **opts)
        prune_s = time.time() - t0
    except Exception as exc:  # record the failure in the table instead of dropping the row
        return _error_record(exc)
    rec = {"flops": res.report.flops_ratio, "params": res.report.params_ratio,
           "prune_s": prune_s, "max_rel_error": res.report.max_rel_error,
           "notes": res.report.notes}
    rec["acc_before"] = evaluate(res.module, *ctx.test_data)
    rec["acc_recal"] = accuracy_after_bn_recalibration(res.module, calib, ctx.test_data)
    t0 = time.time()
    _finetune(res.module, ctx, seed)
    rec["ft_s"] = time.time() - t0
    rec["acc_after"] = evaluate(res.module, *ctx.test_data)
    return rec


def iterative_job(model: torch.nn.Module, criterion: str, budgets: List[float], seed: int,
                  ctx, verify: bool = True) -> Dict:
    """Iterative ``flops=[...]``: re-score between steps, fine-tune each step via
    ``between_steps`` (``ctx.iter_ft_steps`` steps each; the last one is the final FT)."""
    name = criterion
    criterion, opts = method_options(criterion, seed)
    if criterion not in fxprune.list_criteria():
        return {"error": f"criterion {criterion!r} is not registered", "skipped": True}
    calib = ctx.calib[seed]
    state: Dict = {"steps": []}

    def between(module, step):
        acc = evaluate(module, *ctx.test_data)
        _finetune(module, ctx, seed * 100 + step, steps=ctx.iter_ft_steps)
        acc_ft = evaluate(module, *ctx.test_data)
        state["steps"].append({"budget": budgets[step], "acc_before": acc, "acc_after": acc_ft})
        log(f"    iterative {name} step {step} flops<={budgets[step]}: "
            f"acc {acc:.2f} -> {acc_ft:.2f} after FT")

    try:
        t0 = time.time()
        res = fxprune.compile(model, criterion, example_inputs=calib[0][0][:2], data=calib,
                              flops=list(budgets), batches=len(calib), progress=False,
                              verify=verify, between_steps=between, repair=None, **opts)
        total_s = time.time() - t0
    except Exception as exc:
        return _error_record(exc)
    last = state["steps"][-1]
    return {"flops": res.report.flops_ratio, "params": res.report.params_ratio,
            "prune_s": total_s, "acc_before": last["acc_before"], "acc_after": last["acc_after"],
            "steps": state["steps"], "notes": res.report.notes}
