"""The perturbation δθ that the second-order criteria score (option ``perturb``, issue 12).

* ``"weights"`` (default, the papers' definition): OBA / OBA-exact take ``δθ = θ`` on the
  weights and biases of every parameter layer (design §5.1, §5.2); SOSP's structure
  ``θ_s`` is θ on the channel's producer rows, bias and norm-affine entries (§5.3).
* ``"consumer"``: ``δθ`` is *minus* θ on the consumer slices of the prunable channels --
  the input columns of every layer that reads a channel (the next conv's input channels,
  a Linear's input columns, every consumer of a residual stream). Adding it to θ is
  exactly what the rewrite does to the network function: the channel's whole
  post-activation output stops reaching the rest of the net, including what a BN shift
  and the activation contribute when the incoming weights are zero (``"weights"`` misses
  that for every conv→BN→activation block). For OBA / OBA-exact, ``δθ`` is the sum over
  all prunable channels; a channel's score sums ``δθ_i (H̃δθ)_i`` over its consumer
  slices only. For SOSP, ``δθ_s`` is the channel's own consumer slices.

Contract: :func:`perturb_option` reads ``ctx.options["perturb"]`` and raises
:class:`CriterionError` on anything but the two names; :func:`consumer_delta` reads the
groups and parameters and returns new tensors (the parameters are not touched).
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
from torch import Tensor

from ..errors import CriterionError
from ..group import Group
from .aggregate import channel_scores

__all__ = ["PERTURBATIONS", "CONSUMER_ROLES", "perturb_option", "consumer_delta",
           "perturbed_channel_scores"]

PERTURBATIONS = ("weights", "consumer")
#: Member roles whose slices the consumer cut removes.
CONSUMER_ROLES: Tuple[str, ...] = ("consumer",)


def perturb_option(options: Dict, criterion: str) -> str:
    """The validated ``perturb`` option of ``criterion`` (``"weights"`` when unset)."""
    value = options.get("perturb")
    if value is None:
        return "weights"
    if value not in PERTURBATIONS:
        raise CriterionError(
            f"{criterion}: perturb={value!r} is not supported; use perturb='weights' (δθ = θ "
            "on the weights into each channel, the papers' definition, the default) or "
            "perturb='consumer' (δθ = -θ on the consumer input slices, what the rewrite "
            "removes)")
    return value


def consumer_delta(groups: Iterable[Group], params: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``{parameter name: δθ}`` of the consumer cut of every prunable channel: ``-θ`` on the
    consumer members' slices (along each member's dim), 0 elsewhere in that parameter.
    Only parameters with at least one consumer slice appear; dtypes follow ``params``."""
    masks: Dict[str, Tensor] = {}
    for g in groups:
        if not g.prunable:
            continue
        for m in g.members:
            if m.role not in CONSUMER_ROLES or m.target not in params:
                continue
            p = params[m.target]
            mask = masks.setdefault(m.target, torch.zeros(p.shape, dtype=torch.bool,
                                                          device=p.device))
            index = [i for idx in m.index_map for i in idx]
            mask.movedim(m.dim % p.dim(), 0)[index] = True
    return {n: -params[n].detach() * mask.to(params[n].dtype) for n, mask in masks.items()}


def perturbed_channel_scores(groups: Iterable[Group], scores: Dict[str, Tensor],
                             perturb: str) -> Dict[str, Tensor]:
    """Channel scores of OBA / OBA-exact (design §5.5): |signed sum| over every member
    slice for ``"weights"``, over the consumer slices only for ``"consumer"`` (a consumer
    weight is also the producer of the next group, whose rows carry no δθ of theirs)."""
    roles = CONSUMER_ROLES if perturb == "consumer" else None
    return channel_scores(groups, scores, roles=roles)
