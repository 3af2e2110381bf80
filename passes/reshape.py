"""How channel labels travel through view/reshape/flatten/unsqueeze.

Input and output shapes are cut into *view groups*: runs of consecutive dims whose
element counts match (``[B, C, H, W] -> [B, C*H*W]`` has groups ``[B]->[B]`` and
``[C, H, W] -> [C*H*W]``). Inside a group the flattened id array is rebuilt on the
output dims: one labeled dim repeats its ids (``H*W`` columns per channel of a
flatten->Linear), a split of one labeled dim into several yields a :class:`Grid`
(the attention head split), and two independently labeled dims merged into one are
blocked (their channels would interleave).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .labels import UNTRACKED, ChannelSpace, Grid, TLabel


def view_groups(a: Sequence[int], b: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Pairs (in dims, out dims) whose element counts match, in order."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pa, pb = [], [], 1, 1
        if i < len(a):
            pa *= a[i]; gi.append(i); i += 1
        if j < len(b):
            pb *= b[j]; gj.append(j); j += 1
        while pa != pb and (i < len(a) or j < len(b)):
            if (pa < pb and i < len(a)) or j >= len(b):
                pa *= a[i]; gi.append(i); i += 1
            else:
                pb *= b[j]; gj.append(j); j += 1
        groups.append((gi, gj))
    return groups


def _flat_ids(space: ChannelSpace, label: TLabel, dims: List[int], shape, where: str):
    """Flattened ids over ``dims`` (row-major), or None if no dim there is labeled."""
    sizes = [shape[d] for d in dims]
    grid = label.grid
    labeled = [d for d in dims if label.dims[d] is not None and shape[d] > 1]
    in_grid = grid is not None and all(a in dims for a in grid.axes)
    if not labeled and not in_grid:
        return None
    if in_grid and labeled:
        for d in labeled:
            space.block(label.dims[d], f"reshape merges two channel dims at {where}")
        space.block(grid.ids, f"reshape merges two channel dims at {where}")
        return np.full(int(np.prod(sizes)), UNTRACKED, dtype=np.int64)
    if len(labeled) > 1:
        # The merged dim carries the outermost dim's channels (like a flatten over
        # untracked H, W); the other dims may never lose an index: blocked. A block on
        # ids in no group costs nothing (a conv weight's kernel dims flattened with its
        # input dim by weight standardisation, [O, I, kh, kw] -> [1, O, I*kh*kw]).
        for d in labeled[1:]:
            space.block(label.dims[d], f"reshape merges two channel dims at {where}")
        labeled = labeled[:1]
    if in_grid:
        expand_shape = [shape[d] if d in grid.axes else 1 for d in dims]
        ids = grid.ids.reshape(expand_shape)
    else:
        d = labeled[0]
        expand_shape = [shape[k] if k == d else 1 for k in dims]
        ids = label.dims[d].reshape(expand_shape)
    return np.broadcast_to(ids, sizes).reshape(-1)


def _unflatten(flat: np.ndarray, out_dims: List[int], out_shape, dims_out, grids) -> None:
    """Place a flattened id array on the output dims of one view group."""
    big = [d for d in out_dims if out_shape[d] > 1]
    if not big or (flat < 0).all():
        return
    arr = flat.reshape([out_shape[d] for d in big])
    if len(big) == 1:
        dims_out[big[0]] = arr
        return
    # Separable: constant along all axes but one -> a plain labeled dim.
    for k, d in enumerate(big):
        index = [0] * arr.ndim
        index[k] = slice(None)
        line = arr[tuple(index)]
        others = tuple(ax for ax in range(arr.ndim) if ax != k)
        if np.array_equal(np.broadcast_to(np.expand_dims(line, others), arr.shape), arr):
            dims_out[d] = line.copy()
            return
    # A split into several axes (the head split [3*H*D] -> [3, H, D]) keeps its size-1
    # axes: with a single head (H = 1) the head axis is still the unit a head group
    # prunes, and dropping it would leave q, k and v with per-feature channels that a
    # fused reshape cannot slice independently.
    grids.append(Grid(tuple(out_dims), flat.reshape([out_shape[d] for d in out_dims])))


def reshape_label(space: ChannelSpace, label: TLabel, in_shape, out_shape, where: str) -> TLabel:
    """Label of ``x.reshape(out_shape)`` given ``x``'s label."""
    groups = view_groups(in_shape, out_shape)
    if label.grid is not None and not _grid_fits(label.grid, groups, in_shape, out_shape):
        label = space.collapse(label)
    dims_out: List[Optional[np.ndarray]] = [None] * len(out_shape)
    grids: List[Grid] = []
    carried_axes = {}
    for gin, gout in groups:
        if (label.grid is not None and len(gin) == len(gout) == 1
                and gin[0] in label.grid.axes):
            carried_axes[gin[0]] = gout[0]  # a grid axis kept as is
            continue
        flat = _flat_ids(space, label, gin, in_shape, where)
        if flat is not None:
            _unflatten(flat, gout, out_shape, dims_out, grids)
    for g in grids:  # the split must stay a rectangular array under every plan
        space.require_rectangular(g.ids, where)
    grid = None
    if carried_axes:
        axes = tuple(carried_axes[a] for a in label.grid.axes)
        grid = Grid(axes, label.grid.ids)
    elif len(grids) == 1:
        grid = grids[0]
    elif len(grids) > 1:
        out = TLabel(dims_out, None)
        for g in grids:
            out = space.collapse(TLabel(out.dims, g))
        return out
    return TLabel(dims_out, grid)


def _grid_fits(grid: Grid, groups, in_shape, out_shape) -> bool:
    """A grid survives a reshape if it lies inside one view group, or if every one of
    its axes maps unchanged onto one output dim."""
    for gin, gout in groups:
        if all(a in gin for a in grid.axes):
            return True
    for a in grid.axes:
        ok = any(gin == [a] and len(gout) == 1 and out_shape[gout[0]] == in_shape[a]
                 for gin, gout in groups)
        if not ok:
            return False
    return True
