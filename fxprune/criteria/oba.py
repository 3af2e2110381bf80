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
pass that carries the live (autograd) values and the forward-AD tangents side by side
(:mod:`.oba_forward`), one backward for the cotangents (no weight gradients), the local
VJPs, and one backward of the injections -- a constant number of passes, independent of
depth. In conv-FLOPs: a gradient pass is 3 (forward, input and weight gradients), OBA 6
(forward, tangent, input gradients, direct weight terms, injection input and weight
gradients), so ≈ 2 gradient passes plus elementwise work.

Memory: the local VJPs run in backward hooks of the cotangent pass as each cotangent
arrives, and each record then drops its tangents; direct terms go straight into the
float64 score sums. What the injection pass needs at its start is the first pass's graph
and the injections (≈ the layer inputs' size). Option ``batch_chunk`` scores sub-batches
(:func:`~.scoring.over_sub_batches`), so both scale with the sub-batch.

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

import functools
import logging
from typing import Callable, Dict, List, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ..errors import CriterionError
from . import ScoringContext, criterion
from .oba_forward import forward
from .oba_graph import GraphPlan, build_plan, scoring_state
from .oba_records import Injections
from .perturb import consumer_delta, perturb_option, perturbed_channel_scores
from .scoring import (batch_loss, calibrate, check_batch_chunk, over_sub_batches,
                      zero_sums)

log = logging.getLogger(__name__)

__all__ = ["oba_scores", "oba_exact_scores"]


# ----------------------------------------------------------------------------- driver
def oba_scores(gm: torch.fx.GraphModule, batches, loss_fn: Optional[Callable] = None, *,
               first_order: bool = False, progress: bool = False,
               delta: Optional[Dict[str, Tensor]] = None,
               batch_chunk: Optional[int] = None) -> Dict[str, Tensor]:
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
    input VJP per layer and batch. ``batch_chunk``: score each batch in sub-batches of at
    most that many samples (memory ∝ the sub-batch; the loss must be a batch mean of
    per-sample losses, :func:`~.scoring.over_sub_batches`); None: whole batches.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise CriterionError(f"OBA needs a torch.fx.GraphModule, got {type(gm).__name__}: "
                             "trace the model first (torch.fx.symbolic_trace)")
    plan = build_plan(gm)
    plan.delta = _restrict(plan, delta, "oba")
    return _average(gm, plan, batches, loss_fn, progress, "oba", batch_chunk,
                    lambda inputs, targets, lf, i, add: _oba_batch(
                        gm, plan, inputs, targets, lf, first_order, i, add))


def oba_exact_scores(gm: torch.fx.GraphModule, batches, loss_fn: Optional[Callable] = None,
                     *, first_order: bool = False, progress: bool = False,
                     delta: Optional[Dict[str, Tensor]] = None,
                     batch_chunk: Optional[int] = None) -> Dict[str, Tensor]:
    """``δθ ⊙ Hδθ`` with the full Hessian of the batch-mean loss (Pearlmutter: the
    gradient of ``g·δθ`` by double backward); same contract as :func:`oba_scores`."""
    plan = build_plan(gm)
    plan.delta = _restrict(plan, delta, "oba-exact")
    return _average(gm, plan, batches, loss_fn, progress, "oba-exact", batch_chunk,
                    lambda inputs, targets, lf, i, add: _exact_batch(
                        gm, plan, inputs, targets, lf, first_order, i, add))


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


def _average(gm, plan: GraphPlan, batches, loss_fn, progress, desc, batch_chunk,
             per_batch):
    """Run ``per_batch(inputs, targets, loss_fn, index, add)`` on every batch (in
    sub-batches of ``batch_chunk`` samples, :func:`~.scoring.over_sub_batches`) in the
    shared calibration loop (:func:`~.scoring.calibrate`: sums all-reduced across ranks);
    ``add(name, term)`` adds ``δθ ⊙ term`` of δθ parameter ``name`` into its float64 sum.
    Returns the average in each parameter's dtype."""
    size = check_batch_chunk(batch_chunk, desc)
    params = dict(gm.named_parameters())
    sums = zero_sums(plan.dtheta)
    dirs = {n: _direction(plan, n, p) for n, p in plan.dtheta.items()}

    def add(name: str, term: Optional[Tensor]) -> None:
        if term is not None and dirs[name] is not None:
            sums[name] += dirs[name] * term

    def step(i, inputs, targets):
        over_sub_batches(inputs, targets, loss_fn, size,
                         lambda x, y, lf: per_batch(x, y, lf, i, add), i)

    with scoring_state(gm, plan.dtheta.values()):
        sums, count = calibrate(gm, batches, step, sums, desc=desc, progress=progress)
    return {name: (sums[name] / count).to(p.dtype) if name in sums else torch.zeros_like(p)
            for name, p in params.items()}


# ----------------------------------------------------------------------------- OBA
def _oba_batch(gm, plan: GraphPlan, inputs, targets, loss_fn, first_order, index, add):
    """One (sub-)batch of OBA: ``add(name, H̃δθ [+ g] terms)`` for every δθ parameter.

    Forward (live values + tangents), then the cotangent pass, whose hooks turn each
    record's cotangent into direct terms (added at once) and injections and free its
    tangents, then the injection pass, which consumes the first pass's autograd graph."""
    with fwAD.dual_level():
        output, recs = forward(gm, plan, inputs)
    loss = batch_loss(loss_fn, output, targets, index)
    del output
    names = list(plan.dtheta)
    params = [plan.dtheta[n] for n in names]
    sink = Injections(add)
    grads = _cotangent_pass(loss, recs, params if first_order else [], sink)
    del loss, recs
    outs, couts = sink.outs, sink.couts
    del sink
    hv = (list(torch.autograd.grad(outs, params, couts, allow_unused=True)) if outs
          else [None] * len(params))
    del outs, couts
    for k, name in enumerate(names):
        h, hv[k] = hv[k], None
        add(name, h)
        if first_order:
            add(name, grads[k])


def _cotangent_pass(loss: Tensor, recs: list, params: List[Tensor], sink: Injections
                    ) -> List[Optional[Tensor]]:
    """The backward of ``loss`` that feeds every record its cotangent through a hook on
    its ``hooked`` tensor (:mod:`.oba_records`); the graph is kept for the injection pass.

    The pass captures the input aliases of the fast layers (their cotangents are the
    upward injections) and ``params`` (for the first-order term), so autograd runs every
    node on a path to them -- and no weight gradient unless ``params`` is given. Records
    whose hook did not fire then (their tensor lies on no such path) get a second,
    smaller backward; a tensor the loss does not depend on gets no cotangent. Leaves the
    direct terms and injections in ``sink``; returns the gradients of ``params``."""
    pending: Dict[int, object] = {}
    handles = []
    for k, rec in enumerate(recs):
        t = rec.hooked
        if t is not None:
            pending[k] = rec
            handles.append(t.register_hook(functools.partial(_fire, pending, k, sink)))
    aliases = [r.alias for r in recs if r.alias is not None]
    try:
        got = (torch.autograd.grad(loss, aliases + params, retain_graph=True,
                                   allow_unused=True) if aliases or params else ())
        if pending:
            late = [r.hooked for r in pending.values()]
            torch.autograd.grad(loss, late, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for x, g in zip(aliases, got):
        if g is not None:
            sink.inject(x, g)
    return list(got[len(aliases):])


def _fire(pending: Dict[int, object], k: int, sink: Injections, grad: Tensor) -> None:
    """The cotangent hook of record ``k``: runs it once (a second pass may reach it again);
    returns None, so the cotangent flows on unchanged."""
    rec = pending.pop(k, None)
    if rec is not None:
        rec.on_cotangent(grad, sink)


# ----------------------------------------------------------------------------- exact
def _exact_batch(gm, plan: GraphPlan, inputs, targets, loss_fn, first_order, index, add):
    """One (sub-)batch of OBA-exact: ``add(name, Hδθ [+ g])`` by double backward."""
    names = list(plan.dtheta)
    params = [plan.dtheta[n] for n in names]
    loss = batch_loss(loss_fn, gm(*inputs), targets, index)
    dirs = [_direction(plan, n, p) for n, p in zip(names, params)]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    del loss
    dot = sum((g * d).sum() for g, d in zip(grads, dirs) if g is not None and d is not None)
    for name, g in zip(names, grads) if first_order else ():
        add(name, None if g is None else g.detach())
    del grads                                  # dot's graph does not keep them
    hv = ([None] * len(params) if not isinstance(dot, Tensor) or not dot.requires_grad
          else list(torch.autograd.grad(dot, params, allow_unused=True)))
    del dot
    for k, name in enumerate(names):
        h, hv[k] = hv[k], None
        add(name, h)


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
                      progress=ctx.progress, delta=_delta(ctx, gm, desc),
                      batch_chunk=ctx.options.get("batch_chunk"))
    score.__name__ = score.__qualname__ = f"_score_{desc.replace('-', '_')}"
    return score


criterion("oba", "Optimal Brain Apoptosis: θ·H̃θ with the series/parallel (bilinear-node) "
                 "Hessian blocks, one forward-AD and two backward passes per batch (options "
                 "perturb='consumer': δθ = the consumer cut; batch_chunk: sub-batch size)",
          aggregate=_aggregate, options=("first_order", "perturb", "batch_chunk"))(
    _registry_entry(oba_scores, "oba"))
criterion("oba-exact", "OBA with the full Hessian: θ·Hθ by double backward (Pearlmutter "
                       "HVP; options perturb='consumer', batch_chunk)",
          aggregate=_aggregate, options=("first_order", "perturb", "batch_chunk"))(
    _registry_entry(oba_exact_scores, "oba-exact"))
