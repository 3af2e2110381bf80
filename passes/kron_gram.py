"""Channel ⊗ kernel factored input Gram of a conv: the ``gram="kron"`` statistics of the
``"obs"`` criterion (:mod:`fxprune.criteria.obs`) for convolutions whose full patch Gram
is too wide to invert cheaply (issue 12, scoring cost).

A conv with ``c`` input channels and ``k`` kernel positions has design rows ``x`` of
``d = c·k`` columns, channel-major (:func:`.lstsq.layer_rows`); its exact Gram ``H = Σ xxᵀ``
is ``d x d`` and obs inverts it and runs a greedy with ``k``-column units on it: ``d³``
work, most of a wide layer's cost (resnet50's 4 608-wide layer4 convs). The factored
model is the Kronecker product of the two partial traces,

    H ≈ A ⊗ B / t,   A_{ij} = Σ_p H_{(i,p),(j,p)},  B_{pq} = Σ_i H_{(i,p),(i,q)},  t = tr H,

(channels ``i, j``, kernel positions ``p, q``; equal to ``H`` when channel and spatial
correlations separate; the trace is kept). With ``H`` of that form the structured OBS of
removing input channels is a *scalar* OBS on the channels alone: ``(H⁻¹)_{MM}`` is
``t (A⁻¹)_{MM} ⊗ B⁻¹``, so with ``S = (B/t)^{1/2}`` and the weight rows
``Ŵ_{(o,p), i} = (W_{o,i,:} S)_p`` the error increase of removing channels ``M`` with the
optimal update of the rest is the one of :mod:`.obs_solve` on ``(A⁻¹, Ŵ)`` — a ``c x c``
inverse and a greedy over ``c`` scalar columns, exactly the greedy on ``A ⊗ B / t`` with
``k``-column units (the compensation acts on the channel index only).

A layer's bias (always kept, never removed) is eliminated in closed form: the errors of a
model with a free constant column are those of the centred Gram ``H − s sᵀ / n``
(``s = Σ x``, ``n`` rows), which is what is factored. Damping: each factor gets
``ε · mean diag`` with ``(1 + ε)² = 1 + damp``, so that the damping added to ``A ⊗ B / t``
has the trace of the exact path's ``λI`` (``λ = damp · mean diag H``).

Measured on the quality benchmark (ResNet-20, every 3x3 conv factored; ``benchmarks/
quality/RESULTS.md``): accuracy equal to the exact Gram's within about one seed spread
at kept FLOPs 0.3 and 0.14, post-training and after fine-tuning (2 seeds).

Contract: :class:`KronGram` keeps only the factors' sums (``c² + k² + d`` numbers,
float64) of the same sampled rows the exact Gram would use; nothing here touches a module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .lstsq import augmented_weight, sampled_rows

__all__ = ["KronGram", "kron_problem", "kron_supported"]


def kron_supported(layer: nn.Module) -> bool:
    """Whether ``layer``'s Gram can be factored: an ungrouped Conv1d / Conv2d with more
    than one kernel position (a 1x1 conv's Gram is already ``c x c``)."""
    return (isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups == 1
            and layer.weight[0, 0].numel() > 1)


@dataclass
class KronGram:
    """Sums of the factored Gram over calibration rows (module docstring)."""

    A: Optional[Tensor] = None     # [c, c] Σ over rows and kernel positions
    B: Optional[Tensor] = None     # [k, k] Σ over rows and channels
    s: Optional[Tensor] = None     # [c, k] Σ x
    yy: float = 0.0                # Σ‖y‖², the dense output energy of the same rows
    rows: int = 0

    def add(self, layer: nn.Module, x: Tensor, y: Tensor, max_rows: Optional[int] = None
            ) -> None:
        """Accumulate one call: input ``x``, output ``y``; rows sampled as the exact
        Gram samples them (:func:`.lstsq.sampled_rows`)."""
        cols, out = sampled_rows(layer, x, y, max_rows)
        c, k = layer.weight.shape[1], layer.weight[0, 0].numel()
        patches = cols[0].reshape(-1, c, k)                              # [R, c, k]
        # two plain matrix products in the rows' dtype (as the exact Gram's), summed in
        # float64: A over (row, position) pairs, B over (row, channel) pairs
        by_channel = patches.permute(1, 0, 2).reshape(c, -1)             # [c, R·k]
        a = (by_channel @ by_channel.T).double()
        by_position = patches.reshape(-1, k)                             # [R·c, k]
        b = (by_position.T @ by_position).double()
        s = patches.sum(0, dtype=torch.float64)
        if self.A is None:
            self.A, self.B, self.s = a, b, s
        else:
            self.A, self.B, self.s = self.A + a, self.B + b, self.s + s
        self.yy += float(out.pow(2).sum(dtype=torch.float64))
        self.rows += patches.shape[0]

    @property
    def called(self) -> bool:
        """Whether any batch was accumulated."""
        return self.A is not None

    def factors(self, centred: bool) -> Tuple[Tensor, Tensor, float]:
        """``(A, B, t)`` of the (bias-centred, module docstring) Gram."""
        A, B = self.A, self.B
        if centred and self.rows:
            m = self.s / self.rows                                       # [c, k] mean
            A = A - self.rows * (m @ m.T)
            B = B - self.rows * (m.T @ m)
        return A, B, float(A.trace())


def kron_problem(layer: nn.Module, gram: KronGram, damp: float,
                 weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(A⁻¹, Ŵ)``: the damped channel inverse ``[c, c]`` and the weight rows
    ``[o·k, c]`` whose scalar-unit greedy (:func:`.obs_solve.greedy_removal` with one
    column per input channel) is the structured greedy on ``A ⊗ B / t`` (module
    docstring); float64. ``weights`` ``[o]``: output rows scaled by ``√weights`` first
    (obs' Fisher scale)."""
    A, B, t = gram.factors(centred=layer.bias is not None)
    eps = math.sqrt(1.0 + damp) - 1.0 if damp > 0 else 0.0
    A, B, c, k = _damped(A, eps), _damped(B, eps), A.shape[0], B.shape[0]
    vals, vecs = torch.linalg.eigh(B / max(t, 1e-30))
    root = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T                    # (B/t)^{1/2}
    W = augmented_weight(layer)[0][:, :-1].to(A.device)
    if weights is not None:
        W = W * weights.to(W).clamp_min(0).sqrt().reshape(-1, 1)
    W_hat = (W.reshape(-1, c, k) @ root).transpose(1, 2).reshape(-1, c)  # [o·k, c]
    factor, info = torch.linalg.cholesky_ex(A)
    inverse = (torch.cholesky_inverse(factor) if int(info) == 0   # damp = 0 and singular:
               else torch.linalg.pinv(A, hermitian=True))         # the exact path's fallback
    return inverse, W_hat


def _damped(M: Tensor, eps: float) -> Tensor:
    """``M + eps · mean(diag M) · I`` (a new tensor)."""
    out = M.clone()
    out.diagonal().add_(eps * float(M.diagonal().mean().clamp_min(1e-30)))
    return out
