"""Unstructured pruning: per-weight masks from per-parameter saliencies (design §2).

Contract: scores a traced copy of the model with any criterion, then, for every
Conv/Linear weight, zeroes the fraction ``sparsity`` of entries with the smallest
|score| (per layer). Shapes do not change; the masks are returned with the module.
Tied weights (one tensor under several names) get one mask, applied once, listed
under every name.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from .passes.count import count_flops, count_params
from .passes.groups import analyze
from .passes.budget import Budget
from .passes.frontend import capture
from .passes.layer_rules import LAYER_MODULES
from .passes.score import score_analysis
from .plan import Plan
from .report import CompileResult, Report

def weight_names(gm: torch.fx.GraphModule):
    """Qualified names of the Conv/Linear weights of a GraphModule."""
    return [f"{name}.weight" for name, mod in gm.named_modules() if isinstance(mod, LAYER_MODULES)]


def compile_unstructured(state, sparsity: float) -> CompileResult:
    """``compile(..., unstructured=True, sparsity=r)`` on a :class:`~fxprune.pipeline.PruneState`
    holding the call's model, criterion, inputs, batches, loss and options."""
    Budget.parse(sparsity=sparsity)
    crit, inputs = state.crit, state.inputs
    analysis = analyze(capture(state.model, inputs, **state.trace_kw))
    sal = score_analysis(analysis, crit, state.batches, state.loss, state.options,
                         state.progress)
    sal.parameters = dict(sal.parameters)  # magnitude scores are lazy; the masks change gm
    gm = analysis.gm
    masks: Dict[str, torch.Tensor] = {}
    by_tensor: Dict[int, torch.Tensor] = {}  # tied weights: one mask, applied once
    scored = {id(p): n for n, p in gm.named_parameters()}
    with torch.no_grad():
        for name in weight_names(gm):
            weight = gm.get_parameter(name)
            if id(weight) in by_tensor:
                masks[name] = by_tensor[id(weight)]
                continue
            score = sal.parameters[scored[id(weight)]].abs().reshape(-1).double()
            n_remove = int(math.floor(sparsity * score.numel()))
            mask = torch.ones(score.numel(), dtype=torch.bool)
            if n_remove:
                mask[torch.argsort(score, stable=True)[:n_remove]] = False
            masks[name] = by_tensor[id(weight)] = mask.reshape(weight.shape)
            weight.mul_(masks[name].to(weight.dtype))
    flops = count_flops(gm, inputs)
    params = count_params(gm)
    report = Report(flops, flops, params, params)
    unique = list(by_tensor.values())
    kept = sum(int(m.sum()) for m in unique)
    total = sum(m.numel() for m in unique)
    report.notes.append(f"unstructured: {kept:,} of {total:,} Conv/Linear weights kept "
                        f"({kept / max(total, 1):.3f}); shapes and dense FLOPs unchanged")
    plan = Plan({}, {}, {"criterion": crit.name, "unstructured": True, "sparsity": sparsity})
    return CompileResult(gm, plan, report, saliency=sal, masks=masks)
