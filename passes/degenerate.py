"""Degenerate channel scores fail loud (design §5.5, issue 14).

A criterion whose channel scores are all zero or all equal cannot rank those channels.
``compile`` calls :func:`check_scores` on the groups it is about to select from:

* every such group degenerate (the global ranking carries no information: the plan
  would be arbitrary) -> :class:`~fxprune.errors.DegenerateScoresError` with the reason
  and the fix;
* only some groups -> a ``logging`` warning, returned as a report note; selection then
  ranks those channels by weight norm (:mod:`fxprune.passes.select`).

Non-finite scores never get here: :func:`fxprune.passes.score.score_analysis` refuses them.
The reason is found on the failure path only: for data-driven criteria the loss gradient
is recomputed on the calibration batches, because a loss that is already minimal at the
dense model (a distillation loss against the dense model's own outputs) makes every
gradient-weighted score zero.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..criteria import get_criterion
from ..criteria.scoring import cast_batch, module_device_dtype
from ..errors import DegenerateScoresError
from .lower_attention import math_attention
from .select import tied_groups

log = logging.getLogger(__name__)

_LABELS = ("score with labels: a task loss on real targets, e.g. the default "
           "cross-entropy on ground-truth labels or on the dense model's predicted labels")

#: Per criterion: the fix when the loss gradient is zero at the dense model.
_ZERO_GRADIENT_FIX = {
    "oba": ("OBA weights its curvature H̃ by the loss gradient (design §5.1), so every OBA "
            f"score is 0. Fix: {_LABELS}; or use criterion='oba-exact' or 'sosp-h', whose "
            "full Hessian keeps the loss curvature. first_order=True does not help with "
            "this loss: the term it adds, θ·g, is zero too"),
    "taylor": ("taylor scores are θ·g, so every one is 0. Fix: "
               f"{_LABELS}; or use criterion='oba-exact' or 'sosp-h' (full Hessian)"),
    "obd": ("obd's Fisher is built from per-sample gradients, which are all 0 here. Fix: "
            f"{_LABELS}; or use criterion='oba-exact' or 'sosp-h' (full Hessian)"),
}
_FULL_HESSIAN = ("oba-exact", "sosp-h")
_FLAT_LOSS_FIX = ("the loss curvature along the weights is zero as well: the loss does not "
                  "depend on the parameters there (does loss_fn use the model's outputs, "
                  f"without detaching them?). Fix: {_LABELS}")


def check_scores(criterion: str, scores: Dict[str, torch.Tensor], groups: Sequence,
                 caps: Dict[str, int], ctx=None, warn: bool = True) -> List[str]:
    """Refuse or report groups whose ``scores`` cannot rank their channels.

    ``groups``/``caps``: the groups selection will remove from and how many channels
    each may lose (groups with a zero cap are not looked at); ``ctx``: the criterion's
    :class:`~fxprune.criteria.ScoringContext` (``None`` for data-free scoring). Raises
    :class:`DegenerateScoresError` when every such group ties; otherwise returns the
    warning lines (empty when nothing ties), already logged (at debug level when not
    ``warn``: gradual pruning warns on its first step only). Gradient-weighted criteria
    (oba, taylor, obd) are also refused when the loss is stationary at the dense model up
    to rounding: their scores are then rounding noise, not exactly zero (fused attention
    in the dense outputs vs. its math form while scoring)."""
    _refuse_stationary_loss(criterion, scores, ctx)
    tied = tied_groups(groups, scores, caps)
    if not tied:
        return []
    live = [g.id for g in groups if caps.get(g.id, 0) > 0]
    if len(tied) == len(live):
        raise DegenerateScoresError(_global_message(criterion, tied, ctx))
    note = _partial_message(criterion, tied, len(live))
    log.log(logging.WARNING if warn else logging.DEBUG, "%s", note)
    return [note]


def _refuse_stationary_loss(criterion: str, scores, ctx) -> None:
    """Raise when ``criterion`` weights its scores by the loss gradient and the dense
    model's outputs are a stationary point of the loss (e.g. a distillation loss)."""
    if criterion not in _ZERO_GRADIENT_FIX or not getattr(ctx, "batches", None):
        return
    shift = stationary_shift(ctx)
    if shift is None or shift > _rounding(ctx.module) ** 0.5:
        return
    top = max((float(s.detach().abs().max()) for s in scores.values() if s.numel()),
              default=0.0)
    raise DegenerateScoresError(
        f"{criterion}: the loss gradient is zero at the dense model (up to rounding: the "
        f"outputs sit {shift:.1e} (relative) from the loss minimum), so the scores (max "
        f"|score| {top:.1e}) are rounding noise and any plan would be arbitrary; nothing "
        "was pruned. The loss is one the dense model already minimises, e.g. a "
        "distillation MSE against the dense model's own outputs. "
        + _ZERO_GRADIENT_FIX[criterion])


def _rounding(module) -> float:
    _, dtype = module_device_dtype(module)
    return torch.finfo(dtype).eps


def stationary_shift(ctx, tau: float = 1e-3) -> Optional[float]:
    """How far (relative) the dense outputs on the first calibration batch are from a
    stationary point of the loss: ``|g(y)| / (|g(y(1+τ)) - g(y)| / τ)`` with ``g`` the
    loss gradient w.r.t. the outputs ``y`` (a Newton step's length over |y|, about 1 for a
    task loss, rounding level for a distillation loss at the dense model). ``None``
    when it cannot be computed (no floating outputs, or a loss linear in them)."""
    module = ctx.module
    inputs, targets = cast_batch(ctx.batches[0], module)
    with torch.no_grad(), math_attention():
        leaves, spec = tree_flatten(module(*inputs))
    floating = [i for i, t in enumerate(leaves) if torch.is_tensor(t) and t.is_floating_point()]
    if not floating:
        return None

    def gradient(scale: float) -> Optional[torch.Tensor]:
        parts = list(leaves)
        wrt = [(leaves[i] * scale).detach().requires_grad_(True) for i in floating]
        for i, t in zip(floating, wrt):
            parts[i] = t
        with torch.enable_grad():
            loss = ctx.loss_fn(tree_unflatten(parts, spec), targets)
            if not (torch.is_tensor(loss) and loss.requires_grad):
                return None
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1).double()
                          for t, g in zip(wrt, grads)])

    g0, g1 = gradient(1.0), gradient(1.0 + tau)
    if g0 is None or g1 is None:
        return None
    curvature = float((g1 - g0).norm()) / tau
    if curvature == 0.0:
        return 0.0 if float(g0.norm()) == 0.0 else None
    return float(g0.norm()) / curvature


def _listing(tied: Dict[str, str], kind: str, limit: int = 4) -> str:
    ids = [gid for gid, k in tied.items() if k == kind]
    shown = ", ".join(f"`{gid}`" for gid in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _global_message(criterion: str, tied: Dict[str, str], ctx) -> str:
    """Why every prunable group's scores tie, and what to do."""
    n_zero = sum(kind == "zero" for kind in tied.values())
    zero = n_zero == len(tied)
    what = "are all zero" if zero else (
        f"are all equal within each group ({n_zero} of them all zero)" if n_zero else
        "are all equal within each group")
    head = (f"{criterion}: the channel scores of every prunable group {what} "
            f"({len(tied)} groups), so the ranking carries no information and any plan "
            "would be arbitrary; nothing was pruned. ")
    return head + _reason(criterion, zero, ctx)


def _reason(criterion: str, zero: bool, ctx) -> str:
    """The likely cause (probed on the calibration batches for data-driven criteria)."""
    if not (get_criterion(criterion).needs_data and getattr(ctx, "batches", None)):
        if zero:
            return ("The weights of every prunable channel are zero (an uninitialised or "
                    "zeroed model?). Fix: load trained weights (pretrained=True, "
                    "--checkpoint), or use a data-driven criterion")
        return ("Every channel of each group has the same weight norm (a constant "
                "initialisation?). Fix: load trained weights, or use a data-driven "
                "criterion")
    if not zero:
        return ("The channels are interchangeable at these weights (identical channels, "
                "e.g. a constant initialisation) or the calibration data does not tell "
                "them apart. Fix: load trained weights, or calibrate on real data")
    if loss_gradient_is_zero(ctx):
        return ("The loss gradient is zero at the dense model (a loss the dense model "
                "already minimises, e.g. a distillation MSE against the dense model's own "
                "outputs). " + _zero_gradient_fix(criterion))
    hint = " or first_order=True (adds θ·g)" if criterion == "oba" else ""
    return ("The loss gradient is not zero, yet the criterion gives every channel 0: it "
            "does not see the pruned layers' effect on the loss. Fix: try another "
            f"criterion (e.g. 'oba-exact' or 'l2'){hint}, or report this model")


def _zero_gradient_fix(criterion: str) -> str:
    """What to do when the loss gradient is zero, for ``criterion``."""
    if criterion in _ZERO_GRADIENT_FIX:
        return _ZERO_GRADIENT_FIX[criterion]
    if criterion in _FULL_HESSIAN:
        return f"{criterion} uses the full Hessian, and " + _FLAT_LOSS_FIX
    return f"Fix: {_LABELS}"


def _partial_message(criterion: str, tied: Dict[str, str], n_live: int) -> str:
    """The warning for some (not all) tied groups."""
    parts = []
    if any(k == "zero" for k in tied.values()):
        parts.append(f"all zero: {_listing(tied, 'zero')}")
    if any(k == "equal" for k in tied.values()):
        parts.append(f"all equal: {_listing(tied, 'equal')}")
    text = (f"{criterion}: the channel scores of {len(tied)} of {n_live} prunable groups tie "
            f"({'; '.join(parts)}); their channels are ranked by weight norm instead.")
    if any(k == "zero" for k in tied.values()):
        text += (" All-zero scores mean the channels do not change the loss at these "
                 "weights, typically a zero-initialised norm after them (timm's random "
                 "weights zero-initialise the last BN of each residual block), so they come "
                 "first in the global ranking (up to max_layer_sparsity of each group). "
                 "Load trained weights, or keep those layers with ignore=[...]")
    return text


def loss_gradient_is_zero(ctx) -> Optional[bool]:
    """Is the gradient of ``ctx.loss_fn`` w.r.t. every parameter of ``ctx.module``
    exactly zero on every calibration batch? ``None`` when it cannot be computed."""
    module, loss_fn = getattr(ctx, "module", None), getattr(ctx, "loss_fn", None)
    if module is None or loss_fn is None:
        return None
    params = [p for p in module.parameters() if p.is_floating_point() and p.requires_grad]
    if not params:
        return None
    for batch in ctx.batches:
        inputs, targets = cast_batch(batch, module)
        with torch.enable_grad(), math_attention():
            loss = loss_fn(module(*inputs), targets)
            if not loss.requires_grad:
                continue  # the loss does not depend on the parameters at all
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        if any(g is not None and bool(g.ne(0).any()) for g in grads):
            return False
    return True
