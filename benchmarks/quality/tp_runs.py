"""Torch-Pruning baselines: Group{Magnitude,Taylor,Hessian}Importance with a global
pruning ratio found by bisection on Torch-Pruning's own FLOPs count."""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from .fx_runs import _error_record, _finetune
from .nets import accuracy_after_bn_recalibration, evaluate

TP_IMPORTANCES = ("tp-magnitude", "tp-taylor", "tp-hessian")


def tp_version() -> str:
    try:
        import importlib.metadata as md
        return md.version("torch-pruning")
    except Exception:  # not installed
        return "not installed"


def _importance(name: str):
    import torch_pruning as tp
    return {"tp-magnitude": tp.importance.GroupMagnitudeImportance(p=2),
            "tp-taylor": tp.importance.GroupTaylorImportance(),
            "tp-hessian": tp.importance.GroupHessianImportance()}[name]


def _gradients(model, name: str, imp, calib, hessian_samples: int) -> Tuple[Dict, Dict]:
    """Calibration statistics on the dense model: mean-loss gradients (Taylor) or
    Torch-Pruning's own per-sample ``accumulate_grad`` (Hessian), keyed by parameter name."""
    model = copy.deepcopy(model).eval()
    names = {p: n for n, p in model.named_parameters()}
    grads, hess = {}, {}
    if name == "tp-taylor":
        model.zero_grad()
        for x, y in calib:
            (F.cross_entropy(model(x), y) / len(calib)).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    elif name == "tp-hessian":
        imp.zero_grad()
        xs = torch.cat([b[0] for b in calib])[:hessian_samples]
        ys = torch.cat([b[1] for b in calib])[:hessian_samples]
        losses = F.cross_entropy(model(xs), ys, reduction="none")
        for i, l in enumerate(losses):
            model.zero_grad()
            l.backward(retain_graph=i + 1 < len(losses))
            imp.accumulate_grad(model)
        hess = {names[p]: (g, imp._counter[p]) for p, g in imp._accu_grad.items()}
    return grads, hess


def _vit_tp_kwargs(model) -> Dict:
    """Head layout for Torch-Pruning on the ViT (its documented timm recipe)."""
    heads = {m.qkv: m.num_heads for m in model.modules() if hasattr(m, "qkv")}
    return {"num_heads": heads, "prune_head_dims": True, "prune_num_heads": False}


def _patch_vit_attrs(model) -> None:
    """Torch-Pruning slices the Linear layers but not the attention's head_dim
    attribute used in ``reshape``: the hand patch from its timm ViT example."""
    for m in model.modules():
        if hasattr(m, "qkv"):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.head_dim * m.num_heads


def _prune_copy(model, ratio: float, name: str, stats, example, is_vit: bool):
    import torch_pruning as tp
    m = copy.deepcopy(model).eval()
    imp = _importance(name)
    grads, hess = stats
    by_name = dict(m.named_parameters())
    for n, g in grads.items():
        by_name[n].grad = g.clone()
    if hess:
        imp._accu_grad = {by_name[n]: g.clone() for n, (g, c) in hess.items()}
        imp._counter = {by_name[n]: c for n, (g, c) in hess.items()}
        for n in hess:  # TP's __call__ writes accu/count into an existing .grad
            by_name[n].grad = torch.zeros_like(by_name[n])
    head = m.head if is_vit else m.fc
    kw = _vit_tp_kwargs(m) if is_vit else {}
    pruner = tp.pruner.MetaPruner(m, example, importance=imp, global_pruning=True,
                                  pruning_ratio=ratio, max_pruning_ratio=0.95,
                                  ignored_layers=[head], **kw)
    pruner.step()
    if is_vit:
        _patch_vit_attrs(m)
    for p in m.parameters():
        p.grad = None
    return m


def _bisect(model, name, stats, example, is_vit, target: float, iters: int):
    """Largest global ratio whose kept FLOPs is >= target; returns (copy, ratio, kept).
    Kept FLOPs are counted with ``torch.utils.flop_counter``, as for the fxprune rows:
    TP's own ``count_ops_and_params`` leaves out the attention matmuls, so bisecting on
    it kept 0.34-0.38 of the ViT's FLOPs for a 0.3 target (earlier runs of this file)."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        cand = _prune_copy(model, mid, name, stats, example, is_vit)
        kept = _fx_counts(model, cand, example)[0]
        if kept >= target:
            lo, best = mid, (cand, mid, kept)
        else:
            hi = mid
    if best is None:
        cand = _prune_copy(model, lo, name, stats, example, is_vit)
        best = (cand, lo, _fx_counts(model, cand, example)[0])
    return best


def tp_prune(model, name: str, budget: float, seed: int, ctx, is_vit: bool) -> Dict:
    """Torch-Pruning with importance ``name`` to the kept-FLOPs target: the measured
    columns plus ``"slim"`` (the pruned copy), or an error record."""
    try:
        import torch_pruning as tp
    except ImportError as exc:
        return {"error": f"torch-pruning not installed: {exc}", "skipped": True}
    calib = ctx.calib[seed]
    example = calib[0][0][:2]
    torch.manual_seed(seed)
    try:
        t0 = time.time()
        stats = _gradients(model, name, _importance(name), calib, ctx.hessian_samples)
        score_s = time.time() - t0
        slim, ratio, _ = _bisect(model, name, stats, example, is_vit, budget,
                                 ctx.bisect_iters)
        prune_s = time.time() - t0
        flops, params = _fx_counts(model, slim, example)
        slim(example)  # the pruned model must still run
    except Exception as exc:
        return _error_record(exc)
    kept_tp = tp.utils.count_ops_and_params(slim, example)[0] / \
        tp.utils.count_ops_and_params(model, example)[0]
    return {"slim": slim, "flops": flops, "params": params, "flops_tp": kept_tp,
            "tp_ratio": ratio, "prune_s": prune_s, "score_s": score_s}


def tp_job(model, name: str, budget: float, seed: int, ctx, is_vit: bool) -> Dict:
    """Torch-Pruning with importance ``name`` to the kept-FLOPs target, then shared FT."""
    rec = tp_prune(model, name, budget, seed, ctx, is_vit)
    if "error" in rec:
        return rec
    slim = rec.pop("slim")
    rec["acc_before"] = evaluate(slim, *ctx.test_data)
    rec["acc_recal"] = accuracy_after_bn_recalibration(slim, ctx.calib[seed], ctx.test_data)
    _finetune(slim, ctx, seed)
    rec["acc_after"] = evaluate(slim, *ctx.test_data)
    return rec


def _fx_counts(dense, slim, example) -> Tuple[float, float]:
    """Kept FLOPs / params measured the same way as the fxprune rows
    (``torch.utils.flop_counter``; parameter count)."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(m):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m.eval()(example)
        return fc.get_total_flops()

    def params(m):
        return sum(p.numel() for p in m.parameters())
    return flops(slim) / flops(dense), params(slim) / params(dense)


def tp_names() -> List[str]:
    return list(TP_IMPORTANCES)
