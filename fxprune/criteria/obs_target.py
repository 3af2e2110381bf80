"""obs in gradual steps: each consumer's problem toward the *dense* layer's outputs.

``compile(criterion="obs", steps=N)`` re-scores a masked copy of the model after every
step (:mod:`fxprune.passes.gradual`). Scored like one-shot obs, each consumer's greedy
would start from its masked weights — the channels removed so far zeroed, the rest
uncompensated — and measure reconstruction error toward the *masked* layer's outputs:
the error of earlier removals is never counted, and every step compensates as if the
network it sees were the dense one. On ResNet-20 that variant lost 38 / 55 points
against one-shot obs (``benchmarks/quality/RESULTS.md``).

With ``target="dense"`` (the default in gradual steps, ``"auto"``) each consumer's
problem is the repair pass's: fit the dense layer's output ``y`` from the masked
model's input ``x̃`` of the same batch, kept columns only,

    Ŵ = argmin Σ‖W x̃ − y‖² + λ‖W − W₀‖²  over W with the removed columns 0,

(``λ = damp · mean diag H``, ``W₀`` the masked layer's weights, ``H = Σ x̃x̃ᵀ`` and
``C = Σ y x̃ᵀ`` summed by :func:`~fxprune.criteria.obs_stats.accumulate_grams` with the
dense model as reference). Then the same greedy as one-shot obs runs from ``Ŵ`` on
``(H + λI)⁻¹``: a removed unit's columns are 0 in ``Ŵ``, so it costs 0 and leaves the
weights alone, and its downdate turns the inverse into the kept columns' one — the
greedy's first steps *are* the restriction to the kept set. Each kept unit's ``ΔE`` is
then the increase of the dense-target error with compensation, as in one-shot obs
(where the masked model is the dense one and ``Ŵ = W`` up to the damping). The
inputs ``x̃`` are still those of the masked, uncompensated upstream: the repair pass
re-fits layer after layer at the end. Factored (``gram="kron"``) consumers keep the
masked target (their factors have no cross term).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..passes.lstsq import LayerGram, augmented_weight
from ..passes.obs_solve import damped_inverse, damping

__all__ = ["TARGETS", "removed_columns", "dense_target_problem"]

#: Option ``target`` of obs: what each consumer's problem reconstructs.
TARGETS = {"auto": "'dense' in gradual steps (compile(steps=N)), else the model itself",
           "dense": "the dense layer's outputs, from the masked model's inputs (gradual)",
           "masked": "the scored (masked) model's own layer outputs"}


def removed_columns(layer: nn.Module, units: List[Tensor], indices: List[List[int]]
                    ) -> List[int]:
    """The design columns of the units whose weight slices (``indices`` along dim 1)
    are all zero in ``layer``: the channels earlier steps removed (the masked reference
    zeroes the consumer slices, :func:`fxprune.passes.verify.masked_reference`)."""
    weight = layer.weight.detach()
    out: List[int] = []
    for cols, idx in zip(units, indices):
        if not bool(weight.index_select(1, torch.as_tensor(idx, device=weight.device)).any()):
            out.extend(cols.tolist())
    return out


def dense_target_problem(layer: nn.Module, gram: LayerGram, removed: List[int], damp: float,
                         dtype: torch.dtype, weights: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor]:
    """``((H + λI)⁻¹, Ŵ)`` in ``dtype`` for the greedy (module docstring): ``Ŵ`` ``[o, d]``
    (``d`` design columns, the constant one included where the layer has a bias) fits
    the dense outputs summed in ``gram.C`` with the ``removed`` columns held at 0.
    ``weights`` ``[o]``: rows scaled by ``√weights`` (obs' ``scale="fisher"``)."""
    size = gram.unknowns - (0 if layer.bias is not None else 1)
    H = gram.H[0, :size, :size].double().contiguous()
    C = gram.C[0, :, :size].double()
    W0 = augmented_weight(layer)[0][:, :size].to(H)
    lam = damping(torch.diagonal(H), damp)
    gone = torch.zeros(size, dtype=torch.bool)
    gone[torch.as_tensor(removed, dtype=torch.long)] = True
    kept = (~gone).nonzero().flatten().to(H.device)
    Hk = H.index_select(0, kept).index_select(1, kept)
    Hk.diagonal().add_(lam)
    rhs = (C.index_select(1, kept) + lam * W0.index_select(1, kept)).T
    factor, info = torch.linalg.cholesky_ex(Hk)
    sol = (torch.cholesky_solve(rhs, factor) if not bool(info) else
           torch.linalg.lstsq(Hk, rhs, driver="gelsd" if Hk.device.type == "cpu" else None
                              ).solution)
    W = torch.zeros_like(W0)
    W[:, kept] = sol.T
    if weights is not None:
        W = W * weights.to(W).clamp_min(0).sqrt().reshape(-1, 1)
    inverse = damped_inverse(H, damp, dtype, overwrite=True)  # float64 if float32 fails
    return inverse, W.to(inverse.dtype)
