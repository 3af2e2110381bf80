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

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["consumer_columns", "damped_inverse", "damping", "greedy_removal",
           "inverse_if_positive_definite", "remove_columns", "removal_errors"]


def consumer_columns(layer: nn.Module, indices: Sequence[int]) -> Tensor:
    """Columns of :func:`.lstsq.layer_rows`' design rows that belong to input channels
    ``indices`` (indices along dim 1 of ``layer.weight``): ``k`` columns per channel for a
    conv with ``k`` kernel positions (``F.unfold`` is channel-major), one for a Linear."""
    per = int(layer.weight[0, 0].numel()) if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else 1
    base = torch.as_tensor(list(indices), dtype=torch.long).reshape(-1, 1) * per
    return (base + torch.arange(per).reshape(1, -1)).reshape(-1)


def damped_inverse(H: Tensor, damp: float, dtype: torch.dtype = torch.float64, *,
                   overwrite: bool = False) -> Tensor:
    """``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)`` (:func:`damping`), in ``dtype``
    (float64, or float32 for the fast approximate path; ``H + λI`` is formed in float64
    and rounded). Cholesky, falling back to float64 when a float32 factorisation fails
    and to a pseudo-inverse when ``H + λI`` is not positive definite (e.g. ``damp = 0``).
    ``overwrite=True``: a float64 ``H`` the caller no longer needs receives the damping
    in place (no copy: for d = 4 609 a float64 copy is 162 MiB)."""
    owned = overwrite and H.dtype == torch.float64
    Hd = H if owned else H.double().clone()
    Hd.diagonal().add_(damping(torch.diagonal(Hd), damp))
    inverse = inverse_if_positive_definite(Hd.to(dtype))
    if inverse is None and dtype != torch.float64:
        inverse = inverse_if_positive_definite(Hd)
    return inverse if inverse is not None else torch.linalg.pinv(Hd, hermitian=True)


def damping(diagonal: Tensor, damp: float) -> float:
    """``λ = damp · mean(diag H)`` (0 for ``damp = 0``)."""
    return damp * float(diagonal.double().mean().clamp_min(1e-30)) if damp > 0 else 0.0


def inverse_if_positive_definite(A: Tensor, *, overwrite: bool = False) -> Optional[Tensor]:
    """``A⁻¹`` by Cholesky in ``A``'s dtype, or None when the factorisation fails.
    ``overwrite=True``: ``A`` (contiguous, the caller's to lose) is factored and inverted
    in its own storage — on a wide layer each d x d copy is the peak's largest term —
    and is garbage afterwards whether or not the factorisation succeeds."""
    if not overwrite:
        factor, info = torch.linalg.cholesky_ex(A)
        return _inverse_from_cholesky(factor) if int(info) == 0 else None
    # LAPACK works on column-major storage: A's transpose is A's own storage read that
    # way (A is symmetric), so factor and inverse need no copy; the result is symmetric.
    info = torch.empty((), dtype=torch.int32, device=A.device)
    F = A.mT
    torch.linalg.cholesky_ex(F, out=(F, info))
    return _inverse_from_cholesky(F, overwrite=True).mT if int(info) == 0 else None


def _inverse_from_cholesky(factor: Tensor, overwrite: bool = False) -> Tensor:
    """``(L Lᵀ)⁻¹``. ``torch.cholesky_inverse`` (LAPACK potri, half the work of two
    triangular solves) is 1.8x faster than ``cholesky_solve(I)`` on one thread here
    (d = 4608), about even on two unloaded threads, but an earlier profile on this MKL
    CPU build measured it 10-15x slower (threads at torch's default on a loaded
    machine): on CPU it is used on one thread only (``benchmarks/RESULTS.md``)."""
    if factor.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.cholesky_inverse(factor, out=factor) if overwrite else (
            torch.cholesky_inverse(factor))
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return torch.cholesky_solve(eye, factor, out=eye)


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


#: Pending downdate columns folded into the stored inverse at once (which also drops the
#: removed rows and columns): bounds the width of each step's lazy product. 128 against
#: 256: scalar-unit greedies (d = 1 024 – 2 048) 10–15 % faster, 9-column units level
#: (1 thread, float32, this machine); a fold's matrix product stays wide enough for BLAS.
FLUSH_COLUMNS = 128


def _trace_solve(K: Tensor, G: Tensor) -> Tensor:
    """``[n]``: ``tr(K_i⁻¹ G_i)`` for SPD blocks ``K`` and ``G`` ``[n, s, s]``."""
    factor, info = torch.linalg.cholesky_ex(K)
    if bool(info.any()):  # not positive definite (damp = 0): a general solve
        return torch.diagonal(torch.linalg.solve(K, G), dim1=1, dim2=2).sum(1)
    return torch.diagonal(torch.cholesky_solve(G, factor), dim1=1, dim2=2).sum(1)


class _Greedy:
    """Working set of :func:`greedy_removal` on the columns still present.

    Both the inverse and the compensated weight are kept lazily: the inverse at the
    current step is ``H − L Rᵀ`` and the weight ``W − U Rᵀ``, with ``H``, ``W`` as of the
    last fold (only the columns alive then) and the pending factors of each step
    (``L = h``, ``U = W̃_{:,M}``, ``R = (B⁻¹ hᵀ)ᵀ``: the inverse's and the weight's
    updates share the right factor) in preallocated buffers, folded in by one matrix
    product every ``FLUSH_COLUMNS`` columns (per-step rank-b updates of the whole
    ``d x d`` inverse and ``o x d`` weight were memory-bound). The errors need, per
    remaining unit ``u`` with ``s`` columns, the diagonal blocks ``K_u = (H⁻¹)_{uu}`` and
    ``G_u = W̃_{:,u}ᵀ W̃_{:,u}`` (``ΔE_u = tr(K_u⁻¹ G_u)``); both are downdated every step
    from the removed columns' rows (``W̃_{:,M}ᵀ W̃``, one product with the stored weight),
    and re-gathered exactly at every fold, so no step reads the full inverse or gathers
    from the weight. Removed units are masked (``inf``) until the next fold drops them.
    Scalar units (1x1 convs, Linear) keep ``K`` and ``G`` as vectors over every compact
    column (``diag H⁻¹``, ``diag W̃ᵀW̃``), downdated by whole-vector operations and read at
    the units' positions (``at``, fixed between folds): such layers take one step per
    input channel, so each step is a few vector operations and no per-unit gathers."""

    def __init__(self, Hinv: Tensor, W: Tensor, units: Sequence[Tensor]):
        dev, d = Hinv.device, Hinv.shape[0]
        if not Hinv.is_contiguous():  # LAPACK's column-major result: symmetric, so its
            Hinv = Hinv.mT if Hinv.mT.is_contiguous() else Hinv.contiguous()  # transpose
        self.H, self.W = Hinv, W.to(Hinv.dtype).clone()  # Hinv: owned (greedy_removal)
        self.alive = torch.arange(d, device=dev)        # compact -> original
        self.pos = self.alive.clone()                   # original -> compact
        self.removed = torch.zeros(d, dtype=torch.bool, device=dev)
        self.cap = max(int(FLUSH_COLUMNS), 1)
        self.L, self.R = Hinv.new_empty(d, self.cap), Hinv.new_empty(d, self.cap)
        self.U = Hinv.new_empty(W.shape[0], self.cap)
        self.filled = 0
        self.units = [u.to(dev) for u in units]
        self.gone = torch.zeros(len(units), dtype=torch.bool, device=dev)
        by_size: Dict[int, List[int]] = {}
        for i, u in enumerate(self.units):
            by_size.setdefault(len(u), []).append(i)
        self.ids = {s: torch.as_tensor(v, device=dev) for s, v in by_size.items()}
        self.cols = {s: torch.stack([self.units[i] for i in v]) for s, v in by_size.items()}
        self.K: Dict[int, Tensor] = {}
        self.G: Dict[int, Tensor] = {}
        self.at: Dict[int, Tensor] = {}
        # all units scalar: ids stay 0..n-1 (removed units are masked, not dropped), so
        # errors need no scatter and a unit's column is one lookup
        self.plain = list(self.ids) == [1]
        self.scalar_cols = torch.cat(self.units) if self.plain else None
        self._gather()

    def _gather(self) -> None:
        """Exact blocks ``K_u``, ``G_u`` of the remaining units from the folded ``H``, ``W``
        (scalar units: vectors over the compact columns)."""
        for s, cols in self.cols.items():
            c = self.at[s] = self.pos[cols]                               # [n_s, s]
            if s == 1:  # vectors over all compact columns (class docstring)
                self.K[s], self.G[s] = self.H.diagonal().clone(), self.W.pow(2).sum(0)
                continue
            w = self.W[:, c].permute(1, 2, 0)                             # [n_s, s, o]
            self.K[s] = self.H[c[:, :, None], c[:, None, :]]
            self.G[s] = torch.bmm(w, w.transpose(1, 2))

    def errors(self, n: int) -> Tensor:
        """``[n]``: each remaining unit's ``ΔE`` now; ``inf`` for removed units."""
        if self.plain:  # unit i is compact column at[1][i]: no scatter (class docstring)
            e = (self.G[1] / self.K[1]).index_select(0, self.at[1][:, 0])
            return e.clamp_min(0).masked_fill(self.gone, float("inf"))
        out = torch.full((n,), float("inf"), dtype=self.H.dtype, device=self.H.device)
        for s, ids in self.ids.items():
            if not len(ids):
                continue
            gone = self.gone[ids]
            if s == 1:
                e = (self.G[s] / self.K[s]).index_select(0, self.at[s][:, 0])
            else:  # removed units' blocks are 0 until the next fold: solve with I there
                eye = torch.eye(s, dtype=self.H.dtype, device=self.H.device)
                e = _trace_solve(torch.where(gone[:, None, None], eye, self.K[s]), self.G[s])
            out[ids] = e.clamp_min(0).masked_fill(gone, float("inf"))
        return out

    def remove(self, chosen: Tensor) -> None:
        """Delete the units ``chosen``: compensate ``W`` and downdate the inverse."""
        orig = (self.scalar_cols.index_select(0, chosen) if self.scalar_cols is not None
                else torch.cat([self.units[u] for u in chosen.tolist()]))
        M, f = self.pos.index_select(0, orig), self.filled
        L, R, U = self.L[:, :f], self.R[:, :f], self.U[:, :f]
        h_rows = self.H.index_select(0, M).T  # = H[:, M]: H is symmetric, rows contiguous
        w_m = self.W[:, M]   # (index_select along dim 1 copies the whole W here)
        if f:
            r_m = R.index_select(0, M).T
            h, w_m = torch.addmm(h_rows, L, r_m, alpha=-1), w_m.addmm_(U, r_m, alpha=-1)
        else:
            h = h_rows
        hm = h.index_select(0, M)
        proj = h.T / hm if len(M) == 1 else torch.linalg.solve(hm, h.T)   # [m, d_a]
        y = w_m.T @ self.W                                   # [m, d_a] = W̃_Mᵀ W̃
        if f:
            y = torch.addmm(y, w_m.T @ U, R.T, alpha=-1)
        self._downdate_blocks(h, proj, y, y.index_select(1, M))
        self.removed.index_fill_(0, orig, True)
        self.gone.index_fill_(0, chosen, True)
        m = len(M)
        if f + m > self.cap:
            self.fold(h, proj, w_m)
        else:
            self.L[:, f:f + m], self.R[:, f:f + m], self.U[:, f:f + m] = h, proj.T, w_m
            self.filled = f + m

    def _downdate_blocks(self, h: Tensor, proj: Tensor, y: Tensor, y_mm: Tensor) -> None:
        """``K_u −= h_uᵀ P_u``; ``G_u −= P_uᵀ y_u + y_uᵀ P_u − P_uᵀ y_MM P_u`` (``P = proj``)."""
        for s, cols in self.cols.items():
            if not len(cols):
                continue
            c = self.at[s]
            if s == 1:  # whole vectors (class docstring); 2y − y_MM P, then Σ_m P ⊙ ·
                self.K[s] = self.K[s] - (h.T * proj).sum(0)
                self.G[s] = self.G[s] - torch.addmm(y, y_mm, proj, beta=2, alpha=-1).mul_(
                    proj).sum(0)
                continue
            p, yc = proj[:, c].permute(1, 0, 2), y[:, c].permute(1, 0, 2)  # [n_s, m, s]
            self.K[s] = self.K[s] - torch.bmm(h[c], p)
            cross = torch.bmm(p.transpose(1, 2), yc)
            self.G[s] = self.G[s] - cross - cross.transpose(1, 2) + torch.bmm(
                p.transpose(1, 2), torch.matmul(y_mm, p))

    def fold(self, h: Optional[Tensor] = None, proj: Optional[Tensor] = None,
             w_m: Optional[Tensor] = None) -> None:
        """Drop the removed rows and columns from ``H``, ``W`` and the unit lists, fold
        the pending factors (and ``h proj``, ``w_m proj``, not buffered) into what is
        kept, and re-gather the blocks."""
        f = self.filled
        idx = (~self.removed[self.alive]).nonzero().squeeze(1)
        L, R, U = self.L[idx, :f], self.R[idx, :f], self.U[:, :f]
        if h is not None:
            L, R, U = torch.cat([L, h[idx]], 1), torch.cat([R, proj.T[idx]], 1), torch.cat(
                [U, w_m], 1)
        self.H = _symmetric_downdate(_compact_in_place(self.H, idx), L, R)
        self.W = _select_columns(self.W, idx).addmm_(U, R.T, alpha=-1)
        self.filled = 0
        self.L, self.R = self.L[:len(idx)], self.R[:len(idx)]   # buffers: contents unused
        self.alive = self.alive[idx]
        self.pos[self.alive] = torch.arange(len(self.alive), device=self.alive.device)
        self.pos[self.removed] = 0   # any valid column: removed units are masked
        for s in ([] if self.plain else self.ids):
            left = ~self.gone[self.ids[s]]
            self.ids[s], self.cols[s] = self.ids[s][left], self.cols[s][left]
        self._gather()


#: Rows per block of :func:`_compact_in_place` (the temporary is this many rows).
COMPACT_ROWS = 256


def _compact_in_place(T: Tensor, idx: Tensor) -> Tensor:
    """``T[idx][:, idx]`` for sorted ``idx``, written into ``T``'s own storage (a
    contiguous square matrix, clobbered) and returned as a contiguous view: no second
    ``d x d`` matrix at a fold, where it would be the peak of a wide layer. Row block
    ``[a, b)`` of the result lands at elements ``[a k, b k)``, below the first element
    ``idx[b] · d`` of every source row not yet read (``idx[j] >= j``, ``k <= d``)."""
    k, flat = len(idx), T.view(-1)
    for a in range(0, k, COMPACT_ROWS):
        block = _select_columns(T.index_select(0, idx[a:a + COMPACT_ROWS]), idx)
        flat[a * k:a * k + block.numel()].copy_(block.reshape(-1))
    return flat[:k * k].view(k, k)


def _select_columns(T: Tensor, idx: Tensor) -> Tensor:
    """``T[:, idx]`` for sorted ``idx``, copied run by run (the kept columns form few
    contiguous runs; ``index_select`` along dim 1 gathers element by element)."""
    breaks = (idx[1:] - idx[:-1] != 1).nonzero().squeeze(1) + 1
    if len(breaks) > 64:
        return T.index_select(1, idx)
    bounds = [0] + breaks.tolist() + [len(idx)]
    starts = idx[torch.as_tensor(bounds[:-1], device=idx.device)].tolist() if len(idx) else []
    return torch.cat([T[:, a:a + (e - b)] for a, b, e in zip(starts, bounds[:-1], bounds[1:])],
                     dim=1) if starts else T[:, :0].clone()


#: Inverses at least this wide are downdated at a fold as the upper triangle of
#: ``SYM_BLOCKS`` x ``SYM_BLOCKS`` blocks, mirrored (the downdate ``h B⁻¹ hᵀ`` is symmetric).
SYM_BLOCK_MIN = 512
SYM_BLOCKS = 4


def _symmetric_downdate(H: Tensor, L: Tensor, R: Tensor) -> Tensor:
    """``H − L Rᵀ`` in place for a symmetric result: the upper block triangle, mirrored."""
    d = H.shape[0]
    if d < SYM_BLOCK_MIN or not L.shape[1]:
        return H.addmm_(L, R.T, alpha=-1) if L.shape[1] else H
    b = -(-d // SYM_BLOCKS)
    for i in range(0, d, b):
        H[i:i + b, i:].addmm_(L[i:i + b], R[i:].T, alpha=-1)
        H[i + b:, i:i + b] = H[i:i + b, i + b:].T
    return H


def greedy_removal(Hinv: Tensor, W: Tensor, units: Sequence[Tensor], per_step: int = 1,
                   *, overwrite: bool = False) -> Tuple[List[int], List[float]]:
    """Remove every unit, cheapest first, compensating after each removal.

    ``Hinv``: the damped inverse Gram (:func:`damped_inverse`); ``W``: ``o x d``; ``units``:
    disjoint column sets. Returns the removal order (indices into ``units``) and the error
    increase ``ΔE`` of each unit at its step, given the units removed before it (ties:
    the lower index first). ``per_step > 1`` removes that many of the cheapest units per
    step (jointly compensated, each reported with its own ``ΔE`` at that step):
    ``n / per_step`` steps instead of ``n``, an approximation of the exact greedy
    (``per_step = 1``). The same quantities as :func:`removal_errors` and
    :func:`remove_columns` applied step by step, computed on a shrinking working set
    (:class:`_Greedy`): about ``d³/3`` multiply-adds in matrix products for a layer
    with ``d`` columns instead of ``d³`` in rank-b updates, and one product with the
    stored weight per step. Only ``WᵀW`` enters ``ΔE``, so a weight with more rows than
    columns is replaced by the ``R`` of its QR factorisation (``d`` rows). Runs in
    ``Hinv``'s dtype (float32 for the fast path; ``W`` is cast). ``overwrite=True``: the
    caller hands ``Hinv`` over (downdated in place instead of copied)."""
    n = len(units)
    W = W.to(Hinv.dtype)
    if W.shape[0] > W.shape[1]:  # only WᵀW matters: R of W = QR (RᵀR = WᵀW), d rows
        W = torch.linalg.qr(W, mode="r").R
    state = _Greedy(Hinv if overwrite else Hinv.clone(), W, units)
    del Hinv  # handed over: its first fold's compaction frees it
    order: List[int] = []
    increases: List[float] = []
    while len(order) < n:
        errs = state.errors(n)
        if per_step == 1:  # the first minimum, as a stable sort's first
            take = torch.argmin(errs).reshape(1)
        else:
            take = torch.argsort(errs, stable=True)[:min(per_step, n - len(order))]
        order.extend(take.tolist())
        increases.extend(errs[take].tolist())
        if len(order) < n:
            state.remove(take)
    return order, increases
