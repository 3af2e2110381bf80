"""Structured Optimal Brain Surgeon on one layer's inputs: the closed forms behind the
``"obs"`` criterion (:mod:`fxprune.criteria.obs`), on the Gram sums of :mod:`.lstsq`.

A Linear / Conv layer with augmented weight ``W`` (``o x d``, input columns flattened as
:func:`.lstsq.layer_rows` flattens them, the bias last) and input Gram matrix
``H = Σ x̃ x̃ᵀ`` reproduces its dense output ``y = W x̃`` exactly. Deleting a set ``M`` of
input columns and re-fitting the kept ones by (damped) least squares toward ``y`` raises
the squared output error by

    ΔE(M) = Σ_o w_{o,M} [(H⁻¹)_{MM}]⁻¹ w_{o,M}ᵀ,

reached by the compensation ``W ← W − W_{:,M} [(H⁻¹)_{MM}]⁻¹ (H⁻¹)_{M,:}`` (columns M
become 0). The inverse restricted to the kept columns is the block downdate
``H⁻¹ ← H⁻¹ − (H⁻¹)_{:,M} [(H⁻¹)_{MM}]⁻¹ (H⁻¹)_{M,:}``, so a greedy removal needs one
inverse per layer. With damping, ``H`` is ``H + λI`` (``λ = damp · mean diag H``) and the
closed forms are exact for ``Σ‖W′x̃ − y‖² + λ‖W′ − W‖²`` (the ridge of :func:`.lstsq.solve`).

Contract: pure functions of float64 tensors; nothing here touches a module or mutates
its arguments.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["consumer_columns", "damped_inverse", "greedy_removal", "remove_columns",
           "removal_errors"]


def consumer_columns(layer: nn.Module, indices: Sequence[int]) -> Tensor:
    """Columns of :func:`.lstsq.layer_rows`' design rows that belong to input channels
    ``indices`` (indices along dim 1 of ``layer.weight``): ``k`` columns per channel for a
    conv with ``k`` kernel positions (``F.unfold`` is channel-major), one for a Linear."""
    per = int(layer.weight[0, 0].numel()) if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else 1
    base = torch.as_tensor(list(indices), dtype=torch.long).reshape(-1, 1) * per
    return (base + torch.arange(per).reshape(1, -1)).reshape(-1)


def damped_inverse(H: Tensor, damp: float) -> Tensor:
    """``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)`` (float64; Cholesky, falling back to
    a pseudo-inverse when ``H + λI`` is not positive definite, e.g. ``damp = 0``)."""
    H = H.double()
    lam = damp * float(torch.diagonal(H).mean().clamp_min(1e-30)) if damp > 0 else 0.0
    Hd = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    factor, info = torch.linalg.cholesky_ex(Hd)
    if int(info) == 0:
        return torch.cholesky_inverse(factor)
    return torch.linalg.pinv(Hd, hermitian=True)


def removal_errors(Hinv: Tensor, W: Tensor, units: Sequence[Tensor]) -> Tensor:
    """``[len(units)]``: ``ΔE`` of removing each unit's columns alone (module docstring).
    Units of equal size are solved as one batch."""
    out = torch.empty(len(units), dtype=Hinv.dtype, device=Hinv.device)
    by_size: Dict[int, List[int]] = {}
    for i, u in enumerate(units):
        by_size.setdefault(len(u), []).append(i)
    for which in by_size.values():
        idx = torch.stack([units[i] for i in which]).to(Hinv.device)   # [n, b]
        block = Hinv[idx[:, :, None], idx[:, None, :]]                  # [n, b, b]
        w = W[:, idx].permute(1, 2, 0)                                  # [n, b, o]
        x = torch.linalg.solve(block, w)
        out[torch.as_tensor(which, device=out.device)] = (w * x).sum((1, 2))
    return out.clamp_min(0)


def remove_columns(W: Tensor, Hinv: Tensor, cols: Tensor) -> Tuple[Tensor, Tensor]:
    """Delete columns ``cols``: the compensated weight and the downdated inverse (both
    new tensors; rows and columns ``cols`` of the inverse and columns of ``W`` are 0)."""
    cols = cols.to(Hinv.device)
    h_cols = Hinv[:, cols]                                  # [d, b]
    block = h_cols[cols]                                    # [b, b]
    proj = torch.linalg.solve(block, h_cols.T)          # [b, d] = B⁻¹ (H⁻¹)_{M,:}
    W = torch.addmm(W, W[:, cols], proj, alpha=-1)
    Hinv = torch.addmm(Hinv, h_cols, proj, alpha=-1)       # symmetric up to rounding
    W[:, cols] = 0
    Hinv[cols, :] = 0
    Hinv[:, cols] = 0
    return W, Hinv


def greedy_removal(Hinv: Tensor, W: Tensor, units: Sequence[Tensor], per_step: int = 1
                   ) -> Tuple[List[int], List[float]]:
    """Remove every unit, cheapest first, compensating after each removal.

    ``Hinv``: the damped inverse Gram (:func:`damped_inverse`); ``W``: ``o x d``; ``units``:
    disjoint column sets. Returns the removal order (indices into ``units``) and the error
    increase ``ΔE`` of each unit at its step, given the units removed before it.
    ``per_step > 1`` removes that many of the cheapest units per step (jointly
    compensated, each reported with its own ``ΔE`` at that step): ``n / per_step`` steps
    instead of ``n``, an approximation of the exact greedy (``per_step = 1``)."""
    W, remaining = W.double().clone(), list(range(len(units)))
    order: List[int] = []
    increases: List[float] = []
    while remaining:
        errs = removal_errors(Hinv, W, [units[u] for u in remaining])
        take = torch.argsort(errs, stable=True)[:per_step].tolist()
        chosen = [remaining[k] for k in take]
        order.extend(chosen)
        increases.extend(float(errs[k]) for k in take)
        dropped = set(take)
        remaining = [u for i, u in enumerate(remaining) if i not in dropped]
        if remaining:
            W, Hinv = remove_columns(W, Hinv, torch.cat([units[u] for u in chosen]))
    return order, increases
