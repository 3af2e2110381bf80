"""SOSP criteria (design §5.3): ``"sosp-h"`` and ``"sosp-i"``.

Structures (:mod:`.structures`): channel c of a prunable group = its producer rows, bias
and norm-affine entries; ``θ_struc = Σ_s θ_s``.

``"sosp-h"``: ``λ(s) = |θ_s·g| + ½ |θ_s·(H θ_struc)|`` with the exact Hessian of the
batch-mean loss. Per batch: one forward, one backward with ``create_graph=True`` for g,
and one more backward of ``g·θ_struc`` for ``Hθ_struc`` (Pearlmutter) -- about three
gradient passes, independent of the number of structures. The per-parameter products
``θ⊙g`` and ``θ⊙Hθ_struc`` are summed over batches (float64), all-reduced over
data-parallel ranks, averaged, then summed per structure (signed, roles producer/bias/
norm) and the absolute values are taken term by term. Option ``scale="kernel"`` divides
each structure's saliency by its producers' kernel size (``k_h·k_w``; 1 for Linear).

``"sosp-i"``: the S×S matrix ``Q[s,s'] = ½|θ_sᵀGθ_s'| + |θ_s·g|·δ(s,s')`` with the
Gauss-Newton matrix G (:mod:`.gauss_newton`) and the greedy selection
``argmin_{s∉M} Q[s,s] + 2Σ_{s'∈M} Q[s,s']`` (:func:`greedy_order`, the ``select`` hook).

Option ``perturb="consumer"`` (:mod:`.perturb`): a structure is minus θ on the channel's
consumer slices (the input columns of every layer that reads it, what the rewrite
removes) instead of its producer/bias/norm slices; ``scale="kernel"`` still divides by
the producers' kernel size.

Both criteria return per-parameter scores ``θ⊙g + ½ θ⊙(Cθ_struc)`` (C = H or G) for every
parameter (``Saliency.parameters``), leave the two per-parameter terms in
``ctx.state["sosp"]`` and aggregate them per channel with their own ``aggregate``.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import CriterionError
from ..group import Group
from . import ScoringContext, criterion
from .aggregate import signed_channel_sums
from .scoring import (batch_loss, calibrate, check_batch_chunk, check_finite,
                      over_sub_batches, require_batches, zero_sums)
from .perturb import CONSUMER_ROLES, perturb_option
from .structures import STRUCTURE_ROLES, kernel_sizes, structure_index

log = logging.getLogger(__name__)

__all__ = ["sosp_h_terms", "sosp_aggregate", "greedy_order"]

_SCALES = (None, "none", "kernel")


# ----------------------------------------------------------------------------- SOSP-H
def sosp_h_terms(module: torch.nn.Module, groups: Iterable[Group], batches,
                 loss_fn: Optional[Callable] = None, *, progress: bool = False,
                 perturb: str = "weights", batch_chunk: Optional[int] = None
                 ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Per-parameter ``(δθ⊙g, δθ⊙Hδθ_struc)`` averaged over ``batches``; ``δθ = θ`` on
    the structures' producer/bias/norm slices (``perturb="weights"``) or ``-θ`` on their
    consumer slices (``perturb="consumer"``, :func:`structure_index`).

    ``module``: a scoring copy (eval mode, parameters requiring grad); ``groups``: its
    groups (only prunable ones define ``θ_struc``); ``batches``: list of
    ``(inputs_tuple, targets)``; ``loss_fn(outputs, targets)``: batch-mean loss (mean
    cross-entropy by default). Returns two dicts over every parameter that requires grad, float64,
    each parameter's shape. Raises :class:`DataError` on a non-finite loss or curvature.
    ``batch_chunk``: score each batch in sub-batches of at most that many samples (memory
    ∝ the sub-batch; the loss must be a batch mean, :func:`~.scoring.over_sub_batches`).
    """
    require_batches(batches, "sosp-h")
    size = check_batch_chunk(batch_chunk, "sosp-h")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    index = structure_index(groups, params, perturb)
    struc = index.theta_struc(params)
    names = list(params)
    sums = zero_sums(params, "g", "h")

    def step(i, inputs, targets):
        over_sub_batches(inputs, targets, loss_fn, size, lambda x, y, lf: _hvp_batch(
            module, params, names, struc, index.sign, x, y, lf, sums, i), i)

    with torch.enable_grad():
        sums, count = calibrate(module, batches, step, sums, desc="sosp-h", progress=progress)
    first = {n: sums[f"g:{n}"] / count for n in names}
    second = {n: sums[f"h:{n}"] / count for n in names}
    return first, second


def _hvp_batch(module, params, names, struc, sign, inputs, targets, loss_fn, sums, i) -> None:
    """Add one batch's ``δθ⊙g`` and ``δθ⊙Hδθ_struc`` (double backward) into ``sums``
    (``δθ = sign·θ``; only its structure slices are aggregated)."""
    plist = [params[n] for n in names]
    loss = batch_loss(loss_fn, module(*inputs), targets, i)
    grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
    dot = sum(((g * struc[n]).sum() for n, g in zip(names, grads)
               if g is not None and n in struc), torch.zeros((), device=loss.device))
    del loss
    for n, g in zip(names, grads):          # the first-order term, then free g
        if g is not None:
            sums[f"g:{n}"] += sign * params[n].detach().to(torch.float64) * g.detach()
    del grads
    hv = (list(torch.autograd.grad(dot, plist, allow_unused=True)) if dot.requires_grad
          else [None] * len(plist))
    del dot
    for k, n in enumerate(names):
        h, hv[k] = hv[k], None
        if h is not None:
            check_finite(h, f"the Hessian-vector product at {n}", i)
            sums[f"h:{n}"] += sign * params[n].detach().to(torch.float64) * h


def per_parameter(first: Dict[str, Tensor], second: Dict[str, Tensor],
                  params: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``θ⊙g + ½θ⊙Cθ_struc`` in each parameter's dtype (the criterion's ``score``);
    zeros for parameters without terms (frozen ones)."""
    return {n: (first[n] + 0.5 * second[n]).to(p.dtype) if n in first
            else torch.zeros_like(p.detach()) for n, p in params.items()}


def sosp_aggregate(groups: Iterable[Group], scores: Dict[str, Tensor],
                   ctx: ScoringContext) -> Dict[str, Tensor]:
    """Per channel ``|Σ_{i∈s} θ_i g_i| + ½|Σ_{i∈s} θ_i (Cθ_struc)_i|`` over the
    producer/bias/norm slices, from ``ctx.state["sosp"]`` (left by ``score``); divided
    by the producers' kernel size with option ``scale="kernel"``. Returns
    ``{group id: float64 tensor[size]}`` for every group given (prunable or not)."""
    state = ctx.state.get("sosp")
    if state is None:
        raise CriterionError("the SOSP aggregation needs the terms its score() leaves in "
                             "ctx.state['sosp']: call the criterion's score(ctx) first")
    groups = list(groups)
    roles = CONSUMER_ROLES if _perturb(ctx) == "consumer" else STRUCTURE_ROLES
    first = signed_channel_sums(groups, state["first"], roles=roles)
    second = signed_channel_sums(groups, state["second"], roles=roles)
    out = {gid: first[gid].abs() + 0.5 * second[gid].abs() for gid in first}
    if _scale(ctx) == "kernel":
        params = dict(ctx.module.named_parameters())
        ks = kernel_sizes(groups, params)
        out = {gid: v / ks[gid] for gid, v in out.items()}
    return out


def _scale(ctx: ScoringContext) -> Optional[str]:
    scale = ctx.options.get("scale")
    if scale not in _SCALES:
        raise CriterionError(f"sosp: scale={scale!r} is not supported; use scale='kernel' "
                             "(divide by the producers' kernel size) or leave it unset")
    return None if scale == "none" else scale


def _perturb(ctx: ScoringContext) -> str:
    return perturb_option(ctx.options, "sosp")


@criterion("sosp-h", "SOSP-H: |θ_s·g| + ½|θ_s·(Hθ_struc)| per channel, exact Hessian, one "
                     "Hessian-vector product per batch (options scale='kernel', batch_chunk)",
           aggregate=sosp_aggregate, options=("scale", "perturb", "batch_chunk"))
def _score_sosp_h(ctx: ScoringContext) -> Dict[str, Tensor]:
    _scale(ctx)
    first, second = sosp_h_terms(ctx.module, ctx.groups, ctx.batches, ctx.loss_fn,
                                 progress=ctx.progress, perturb=_perturb(ctx),
                                 batch_chunk=ctx.options.get("batch_chunk"))
    ctx.state["sosp"] = {"first": first, "second": second, "curvature": "hessian"}
    return per_parameter(first, second, dict(ctx.module.named_parameters()))


# ----------------------------------------------------------------------------- SOSP-I
def greedy_order(Q: Tensor, ids: List[Tuple[str, int]], caps: Dict[str, int]
                 ) -> List[Tuple[str, int]]:
    """SOSP-I greedy removal order on the structure matrix ``Q`` (``S×S``, symmetric).

    ``M = ∅``; repeatedly add ``argmin_{s∉M} Q[s,s] + 2Σ_{s'∈M} Q[s,s']`` (ties: lowest
    index) among the eligible structures: those of groups in ``caps`` while fewer than
    ``caps[gid]`` of the group's channels are in M. Returns the full order as
    ``(group id, channel)`` pairs; every prefix is the greedy set of that size.
    O(S²) time, O(S) extra memory.
    """
    S = len(ids)
    if Q.shape != (S, S):
        raise CriterionError(f"greedy_order: Q is {tuple(Q.shape)} but there are {S} "
                             "structures")
    Q = Q.detach().to(torch.float64)
    cost = Q.diagonal().clone()
    members: Dict[str, List[int]] = {}
    for k, (gid, _) in enumerate(ids):
        members.setdefault(gid, []).append(k)
    eligible = torch.zeros(S, dtype=torch.bool, device=Q.device)
    for gid, ks in members.items():
        if caps.get(gid, 0) > 0:
            eligible[ks] = True
    taken = {gid: 0 for gid in members}
    order: List[Tuple[str, int]] = []
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=Q.device)
    while bool(eligible.any()):
        k = int(torch.where(eligible, cost, inf).argmin())
        gid, channel = ids[k]
        order.append((gid, channel))
        cost += 2.0 * Q[:, k]
        eligible[k] = False
        taken[gid] += 1
        if taken[gid] >= caps[gid]:
            eligible[members[gid]] = False
    return order


def _select_sosp_i(groups, channel_scores, ctx: ScoringContext, caps: Dict[str, int]):
    state = ctx.state.get("sosp")
    if state is None or "Q" not in state:
        raise CriterionError("sosp-i selection needs the structure matrix its score() "
                             "leaves in ctx.state['sosp']: score with 'sosp-i' first")
    wanted = {g.id for g in groups}
    caps = {gid: c for gid, c in caps.items() if gid in wanted}
    return greedy_order(state["Q"], state["ids"], caps)


@criterion("sosp-i", "SOSP-I: S×S Gauss-Newton structure matrix with greedy joint selection "
                     "(O(S²) memory; mid-size nets)",
           aggregate=sosp_aggregate, select=_select_sosp_i,
           options=("scale", "jacobian", "chunk", "max_structures", "perturb"))
def _score_sosp_i(ctx: ScoringContext) -> Dict[str, Tensor]:
    from .gauss_newton import gauss_newton_terms

    terms = gauss_newton_terms(
        ctx.module, ctx.groups, ctx.batches, ctx.loss_fn,
        jacobian=ctx.options.get("jacobian", "auto"), chunk=ctx.options.get("chunk"),
        max_structures=int(ctx.options.get("max_structures", 20000)),
        progress=ctx.progress, perturb=_perturb(ctx))
    ctx.state["sosp"] = dict(terms, curvature="gauss-newton")
    return per_parameter(terms["first"], terms["second"], dict(ctx.module.named_parameters()))
