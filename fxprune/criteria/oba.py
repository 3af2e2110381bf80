"""OBA (Optimal Brain Apoptosis) scores, design §5.1, and the exact-Hessian variant §5.2.

Per parameter ``s_i = δθ_i · (H̃ δθ)_i`` with ``δθ = θ`` on the weights and biases of the
parameter layers (Conv/Linear modules; functional linear/conv/matmul nodes with a
parameter operand) and 0 elsewhere. ``H̃ δθ = ∇_θ S(θ)`` where

    S(θ) = Σ over bilinear nodes z = u ⋆ v:  ⟨sg(g_z), u(θ) ⋆ sg(T_v) + sg(T_u) ⋆ v(θ)⟩

``g_z`` is the cotangent of the batch-mean loss at z and ``T_x`` the forward-mode tangent
of x along δθ at the true primal values. ``∇_θ S`` is assembled from local
vector-Jacobian products ("cotangent injections"): for every bilinear node the VJP of
``a ↦ a ⋆ T_v`` at ``g_z`` is injected at u and the VJP of ``b ↦ T_u ⋆ b`` at v, then one
backward pass carries all injections to the parameters. Per batch this costs one forward
pass that carries the live (autograd) values and the forward-AD tangents side by side,
one backward for the cotangents, the local VJPs, and one backward of the injections --
a constant number of passes, independent of depth.

Two identities that hold because δθ = θ on layer parameters keep it cheap: a layer
``Y = F(X; W) + b`` has tangent ``T_Y = F(X + T_X; W) + b`` (one call instead of two), and
its upward injection ``VJP_X[F(·; δW)](g_Y)`` is exactly the message the ordinary backward
sends from Y to X, read off an alias of X in the cotangent pass.

Option ``perturb="consumer"`` (:mod:`.perturb`) scores another δθ: minus θ on the consumer
columns of every prunable channel. The two identities do not hold for it, so a layer's
tangent is ``F(T_X; W) + F(X; δW) + δb`` and its upward injection is computed as an input
VJP with δW (one more layer call and one input VJP per layer; zero where δW = 0); the
channel score sums ``δθ_i (H̃δθ)_i`` over the channel's consumer slices only.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._pytree import tree_map

from ..errors import CriterionError
from . import ScoringContext, criterion
from .oba_graph import GraphPlan, build_plan, scoring_state
from .oba_ops import detach_tree as _detach
from .oba_ops import tangent
from .oba_records import general_layer_tangent, make_record
from .oba_tangents import FALLBACK
from .perturb import consumer_delta, perturb_option, perturbed_channel_scores
from .scoring import batch_loss, calibrate, default_loss, zero_sums

log = logging.getLogger(__name__)

__all__ = ["oba_scores", "oba_exact_scores"]


# ----------------------------------------------------------------------------- driver
def oba_scores(gm: torch.fx.GraphModule, batches, loss_fn: Optional[Callable] = None, *,
               first_order: bool = False, progress: bool = False,
               delta: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """OBA per-parameter scores ``δθ ⊙ H̃δθ`` (+ ``δθ ⊙ g`` with ``first_order``).

    ``gm`` is a traced GraphModule (ideally a :func:`~.scoring.make_scoring_copy`); it
    is run in eval mode with its layer parameters requiring grad, and those flags are
    restored afterwards. ``batches``: list of ``(inputs_tuple, targets)``;
    ``loss_fn(outputs, targets)`` is the batch-mean loss (mean cross-entropy by default).
    Returns ``{parameter name: tensor of its shape and dtype}``, averaged over batches
    (and over data-parallel ranks when ``torch.distributed`` is initialised); parameters
    outside δθ get zeros. ``delta``: ``{parameter name: δθ}`` in place of ``δθ = θ`` (e.g.
    the consumer cut, :func:`~.perturb.consumer_delta`); it must lie on the layer
    parameters (others are dropped with a warning) and costs one more layer call and
    input VJP per layer and batch.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise CriterionError(f"OBA needs a torch.fx.GraphModule, got {type(gm).__name__}: "
                             "trace the model first (torch.fx.symbolic_trace)")
    plan = build_plan(gm)
    plan.delta = _restrict(plan, delta, "oba")
    return _average(gm, plan, batches, loss_fn, progress, "oba",
                    lambda inputs, targets, lf, i: _oba_batch(gm, plan, inputs, targets,
                                                              lf, first_order, i))


def oba_exact_scores(gm: torch.fx.GraphModule, batches, loss_fn: Optional[Callable] = None,
                     *, first_order: bool = False, progress: bool = False,
                     delta: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """``δθ ⊙ Hδθ`` with the full Hessian of the batch-mean loss (Pearlmutter: the
    gradient of ``g·δθ`` by double backward); same contract as :func:`oba_scores`."""
    plan = build_plan(gm)
    plan.delta = _restrict(plan, delta, "oba-exact")
    return _average(gm, plan, batches, loss_fn, progress, "oba-exact",
                    lambda inputs, targets, lf, i: _exact_batch(gm, plan, inputs, targets,
                                                                lf, first_order, i))


def _restrict(plan: GraphPlan, delta: Optional[Dict[str, Tensor]], desc: str
              ) -> Optional[Dict[str, Tensor]]:
    """``delta`` on the δθ (layer) parameters, detached; parameters outside them are
    dropped with a warning (OBA's H̃ is built on the layers only)."""
    if delta is None:
        return None
    outside = sorted(n for n in delta if n not in plan.dtheta)
    if outside:
        log.warning("%s: the perturbation touches %s, which are not parameters of a "
                    "Conv/Linear layer the graph shows; they score 0", desc, outside)
    return {n: d.detach().to(plan.dtheta[n].dtype) for n, d in delta.items()
            if n in plan.dtheta}


def _direction(plan: GraphPlan, name: str, p: Tensor) -> Optional[Tensor]:
    """δθ of the δθ parameter ``name`` (θ itself by default; None where it is 0)."""
    return p.detach() if plan.delta is None else plan.delta.get(name)


def _average(gm, plan: GraphPlan, batches, loss_fn, progress, desc, per_batch):
    """Sum ``per_batch`` scores over ``batches`` (float64 accumulators) in the shared
    calibration loop (:func:`~.scoring.calibrate`: sums all-reduced across ranks), and
    return the average in each parameter's dtype."""
    loss_fn = loss_fn or default_loss
    params = dict(gm.named_parameters())
    sums = zero_sums(plan.dtheta)

    def step(i, inputs, targets):
        for name, s in per_batch(inputs, targets, loss_fn, i).items():
            sums[name] += s.to(torch.float64)

    with scoring_state(gm, plan.dtheta.values()):
        sums, count = calibrate(gm, batches, step, sums, desc=desc, progress=progress)
    return {name: (sums[name] / count).to(p.dtype) if name in sums else torch.zeros_like(p)
            for name, p in params.items()}


# ----------------------------------------------------------------------------- OBA
def _oba_batch(gm, plan: GraphPlan, inputs, targets, loss_fn, first_order, index):
    """One batch of OBA: returns ``{δθ parameter name: δθ ⊙ (H̃δθ [+ g])}``."""
    with fwAD.dual_level():
        output, recs = _forward(gm, plan, inputs)
    loss = batch_loss(loss_fn, output, targets, index)
    names = list(plan.dtheta)
    params = [plan.dtheta[n] for n in names]
    wanted: List[Tensor] = []
    for rec in recs:
        rec.request(wanted)
    extra = params if first_order else []
    got = (torch.autograd.grad(loss, wanted + extra, retain_graph=True, allow_unused=True)
           if wanted or extra else [])
    cot = {id(t): g for t, g in zip(wanted, got)}
    outs: List[Tensor] = []
    couts: List[Tensor] = []
    direct: Dict[str, Tensor] = {}
    for rec in recs:
        rec.inject(cot, outs, couts, direct)
    hv = (torch.autograd.grad(outs, params, couts, allow_unused=True) if outs
          else [None] * len(params))
    scores = {}
    for k, (name, p) in enumerate(zip(names, params)):
        total = torch.zeros_like(p, dtype=p.dtype) if hv[k] is None else hv[k]
        if name in direct:
            total = total + direct[name]
        if first_order and got[len(wanted) + k] is not None:
            total = total + got[len(wanted) + k]
        d = _direction(plan, name, p)
        scores[name] = torch.zeros_like(total) if d is None else d * total
    return scores


def _forward(gm, plan: GraphPlan, inputs):
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
        t_x = tangent(dargs[layer.x])
        with torch.no_grad():
            if t_x is None:
                t_y = value.detach()
            else:
                fargs = [_detach(a) for a in largs]
                fargs[layer.x] = fargs[layer.x] + t_x
                t_y = ex.fn(*fargs, **_detach(lkw))
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


# ----------------------------------------------------------------------------- exact
def _exact_batch(gm, plan: GraphPlan, inputs, targets, loss_fn, first_order, index):
    """One batch of OBA-exact: ``δθ ⊙ Hδθ`` (+ ``δθ ⊙ g``) by double backward."""
    names = list(plan.dtheta)
    params = [plan.dtheta[n] for n in names]
    loss = batch_loss(loss_fn, gm(*inputs), targets, index)
    dirs = [_direction(plan, n, p) for n, p in zip(names, params)]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    dot = sum((g * d).sum() for g, d in zip(grads, dirs) if g is not None and d is not None)
    if not isinstance(dot, Tensor) or not dot.requires_grad:
        hv = [None] * len(params)
    else:
        hv = torch.autograd.grad(dot, params, allow_unused=True)
    scores = {}
    for name, p, d, g, h in zip(names, params, dirs, grads, hv):
        total = torch.zeros_like(p) if h is None else h
        if first_order and g is not None:
            total = total + g.detach()
        scores[name] = torch.zeros_like(total) if d is None else d * total
    return scores


# ----------------------------------------------------------------------------- registry
def _check_module(ctx: ScoringContext) -> torch.fx.GraphModule:
    """``ctx.module``, which must be a traced scoring copy."""
    if not isinstance(ctx.module, torch.fx.GraphModule):
        raise CriterionError("the OBA criteria score a traced model: pass a "
                             "torch.fx.GraphModule scoring copy")
    return ctx.module


def _delta(ctx: ScoringContext, gm: torch.fx.GraphModule, desc: str
           ) -> Optional[Dict[str, Tensor]]:
    """δθ of option ``perturb``: None (θ, the default) or the consumer cut."""
    if perturb_option(ctx.options, desc) == "weights":
        return None
    return consumer_delta(ctx.groups, dict(gm.named_parameters()))


def _aggregate(groups, scores: Dict[str, Tensor], ctx: ScoringContext) -> Dict[str, Tensor]:
    """Channel scores: over every member slice (``perturb="weights"``) or over the
    consumer slices, where the consumer cut's δθ lives (``perturb="consumer"``)."""
    return perturbed_channel_scores(groups, scores, perturb_option(ctx.options, "oba"))


def _registry_entry(scores: Callable, desc: str) -> Callable:
    """The ``score(ctx)`` of criterion ``desc``: ``scores`` (:func:`oba_scores` or
    :func:`oba_exact_scores`) on the context's traced scoring copy."""
    def score(ctx: ScoringContext) -> Dict[str, Tensor]:
        gm = _check_module(ctx)
        return scores(gm, ctx.batches, ctx.loss_fn,
                      first_order=bool(ctx.options.get("first_order", False)),
                      progress=ctx.progress, delta=_delta(ctx, gm, desc))
    score.__name__ = score.__qualname__ = f"_score_{desc.replace('-', '_')}"
    return score


criterion("oba", "Optimal Brain Apoptosis: θ·H̃θ with the series/parallel (bilinear-node) "
                 "Hessian blocks, one forward-AD and two backward passes per batch (option "
                 "perturb='consumer': δθ = the consumer cut)",
          aggregate=_aggregate, options=("first_order", "perturb"))(
    _registry_entry(oba_scores, "oba"))
criterion("oba-exact", "OBA with the full Hessian: θ·Hθ by double backward (Pearlmutter "
                       "HVP; option perturb='consumer')",
          aggregate=_aggregate, options=("first_order", "perturb"))(
    _registry_entry(oba_exact_scores, "oba-exact"))
