"""The forward pass of OBA (:mod:`.oba`, design §5.1): the graph runs once with live
(autograd) values and, side by side, forward-AD dual values along δθ.

Contract of :func:`forward`: it must run inside ``fwAD.dual_level()``; it returns the
live output and one record (:mod:`.oba_records`) per executed bilinear node, each
holding the tangents its cotangent hook will need. Every dual value is dropped after its
last use in the graph (``plan.dies_after``), so tangents are held only by the records.
Tangents come from the cheap rules of :mod:`.oba_tangents` applied to the live primal
where a node has one, else from running the node under forward AD; a fast layer's tangent
is ``F(X + T_X; W) + b = Y + F(T_X; W)`` (one call; δθ = θ) or ``F(T_X; W) + F(X; δW) + δb``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..errors import CriterionError
from .oba_graph import GraphPlan
from .oba_ops import detach_tree as _detach
from .oba_ops import tangent
from .oba_records import general_layer_tangent, make_record
from .oba_tangents import FALLBACK

__all__ = ["forward"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def forward(gm, plan: GraphPlan, inputs):
    """Run the graph once with live (autograd) values and, side by side, forward-AD dual
    values along δθ (computed under ``no_grad``). Must run inside ``fwAD.dual_level()``.
    Returns the live output and the bilinear-node records (tangents unpacked)."""
    live: Dict = {}
    dual: Dict = {}
    recs: list = []
    inputs = list(inputs)
    for pos, node in enumerate(gm.graph.nodes):
        if node.op == "placeholder":
            value = inputs.pop(0) if inputs else (node.args[0] if node.args else None)
            live[node], dual[node] = value, _detach(value)
        elif node.op == "get_attr":
            value = plan.attr(node)
            live[node] = value
            d = _detach(value)
            if node in plan.has_tangent:
                t = plan.delta_of(value)
                d = fwAD.make_dual(d, t if t is not None else torch.zeros_like(d))
            dual[node] = d
        elif node.op == "output":
            return torch.fx.node.map_arg(node.args[0], lambda n: live[n]), recs
        else:
            _run_node(plan, node, live, dual, recs)
        for dead in plan.dies_after[pos]:
            live.pop(dead, None)
            dual.pop(dead, None)
    raise CriterionError("the graph has no output node")


def _run_node(plan: GraphPlan, node, live, dual, recs) -> None:
    """Evaluate one call node on the live and the dual values; record bilinear nodes."""
    ex = plan.execs[node]
    largs, lkw = ex.args(live)
    layer = plan.layers.get(node)
    special = layer is not None or node in plan.bilinear
    dargs, dkw = ex.args(dual) if (special or node in plan.has_tangent) else (None, None)
    if layer is not None:
        x = largs[layer.x]
        if isinstance(x, Tensor) and x.requires_grad:
            largs[layer.x] = x.view_as(x)     # alias: its grad is this layer's message
    value = ex.fn(*largs, **lkw)
    if node not in plan.has_tangent:
        dvalue = _detach(value)
    elif layer is not None and layer.fast and plan.delta is not None:
        with torch.no_grad():
            t_y = general_layer_tangent(plan, layer, ex, largs, lkw,
                                        tangent(dargs[layer.x]), value)
        dvalue = fwAD.make_dual(value.detach(), t_y)
    elif layer is not None and layer.fast:
        with torch.no_grad():
            t_y = _fast_tangent(layer, ex, largs, lkw, tangent(dargs[layer.x]), value)
        dvalue = fwAD.make_dual(value.detach(), t_y)
    else:
        dvalue = _dual_value(plan, node, ex, value, largs, lkw, dargs, dkw)
    live[node], dual[node] = value, dvalue
    if ex.rebind is not None:                  # functionalised in-place op
        live[ex.rebind], dual[ex.rebind] = value, dvalue
    if special:
        rec = make_record(plan, node, ex, largs, lkw, value, dargs)
        if rec is not None:
            recs.append(rec)


def _fast_tangent(layer, ex, largs, lkw, t_x: Optional[Tensor], value: Tensor) -> Tensor:
    """``T_Y = F(X + T_X; W) + b = Y + F(T_X; W)`` (F without its bias) of a fast layer for
    δθ = θ: a Linear module adds Y inside its GEMM (``addmm``), a Conv module adds on
    the smaller of X and Y; other layers call ``F(X + T_X; W) + b``. Runs under no_grad."""
    y, mod = value.detach(), layer.module
    if t_x is None:
        return y
    if isinstance(mod, nn.Linear) and t_x.dim() > 0 and y.shape[-1] == mod.out_features:
        t = torch.addmm(y.reshape(-1, y.shape[-1]), t_x.reshape(-1, t_x.shape[-1]),
                        mod.weight.detach().t())
        return t.view(y.shape)
    if isinstance(mod, _CONVS) and y.numel() < t_x.numel():
        return y + mod._conv_forward(t_x, mod.weight.detach(), None)
    fargs = [_detach(a) for a in largs]
    fargs[layer.x] = fargs[layer.x] + t_x
    return ex.fn(*fargs, **_detach(lkw))


def _dual_value(plan: GraphPlan, node, ex, value, largs, lkw, dargs, dkw):
    """The dual value of a node: from its tangent rule applied to the live primal when
    it has one (no recomputation), else by running the node under forward AD."""
    rule = plan.rules.get(node)
    with torch.no_grad():
        t = rule(value, largs, lkw, dargs, dkw) if rule is not None else FALLBACK
    if t is FALLBACK:
        return _forward_ad(node, ex, dargs, dkw)
    if t is None:
        return _detach(value)
    if isinstance(value, Tensor):
        return fwAD.make_dual(value.detach(), t)
    return type(value)(fwAD.make_dual(v.detach(), ti) for v, ti in zip(value, t))


def _forward_ad(node, ex, dargs, dkw):
    """Run ``node`` on dual values under ``no_grad``; ops whose no-grad path is a fused
    kernel without forward AD (``nn.MultiheadAttention``) are retried with grad on."""
    try:
        with torch.no_grad():
            return ex.fn(*dargs, **dkw)
    except (NotImplementedError, RuntimeError) as exc:
        if "forward AD" not in str(exc):
            raise
        first = exc
    try:
        out = ex.fn(*dargs, **dkw)
    except (NotImplementedError, RuntimeError) as exc:
        raise CriterionError(
            f"OBA: node {node.name!r} ({node.target}) does not support forward-mode AD "
            f"({first}); trace through that module or lower the op before scoring"
        ) from exc

    def redual(v):
        if not isinstance(v, Tensor):
            return v
        p, t = fwAD.unpack_dual(v)
        return fwAD.make_dual(p.detach(), t.detach()) if t is not None else p.detach()
    return tree_map(redual, out)
