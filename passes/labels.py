"""Channel labels: the abstract values of the channel-analysis pass.

Every tensor dimension that carries prunable channels is *labeled* with an int64
array of atomic element ids, one per index along the dimension (``-1`` marks an
index that carries no tracked channel, e.g. the untracked half of a concat).
Atomic ids are created for every dimension of every parameter/buffer the graph
reads (:meth:`ChannelSpace.param_label`); channel rules then add *edges* between
ids that must be pruned together (``a[i] ~ b[i]`` at an add, a layer's input
columns ~ the incoming channel ids, ...) and *blocks* where pruning would be
unsound. At the end, connected components of elements are channels and
connected components of the originating parameter dimensions are groups.

A reshape that splits one labeled dimension into several (the attention head split
``[B, N, 3*H*D] -> [B, N, 3, H, D]``) yields a :class:`Grid`: a multi-dimensional
id array spanning several tensor dims. Grids survive permutes, selects and splits
on their axes and are *collapsed* (made into whole-head channels) when an op needs
per-dimension labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

UNTRACKED = -1
_ROLE_RANK = {"tensor": 0, "bias": 1, "norm": 1, "consumer": 2, "producer": 3}
LAYER_ROLES = ("producer", "consumer")


@dataclass
class Grid:
    """Ids spanning several tensor dims: ``ids.shape[k]`` is the size of dim ``axes[k]``."""

    axes: Tuple[int, ...]
    ids: np.ndarray


@dataclass
class TLabel:
    """Label of one tensor: ``dims[d]`` is None (no channels) or an id array."""

    dims: List[Optional[np.ndarray]]
    grid: Optional[Grid] = None

    @property
    def ndim(self) -> int:
        return len(self.dims)

    def labeled(self) -> bool:
        return self.grid is not None or any(d is not None for d in self.dims)

    @staticmethod
    def untracked(ndim: int) -> "TLabel":
        return TLabel([None] * ndim)

    def copy(self) -> "TLabel":
        return TLabel(list(self.dims), self.grid)

    def all_ids(self) -> np.ndarray:
        parts = [d for d in self.dims if d is not None]
        if self.grid is not None:
            parts.append(self.grid.ids.ravel())
        if not parts:
            return np.empty(0, dtype=np.int64)
        ids = np.concatenate(parts)
        return ids[ids >= 0]

    # -- structural ops that keep grids intact ---------------------------------
    def permute(self, perm: Sequence[int]) -> "TLabel":
        perm = [p % self.ndim for p in perm]
        dims = [self.dims[p] for p in perm]
        grid = None
        if self.grid is not None:
            new_pos = {old: new for new, old in enumerate(perm)}
            moved = [new_pos[a] for a in self.grid.axes]
            order = np.argsort(moved)
            grid = Grid(tuple(sorted(moved)), np.transpose(self.grid.ids, order))
        return TLabel(dims, grid)

    def select(self, dim: int, index: int) -> "TLabel":
        """Label after integer-indexing ``dim`` (the dim disappears)."""
        dim %= self.ndim
        dims = self.dims[:dim] + self.dims[dim + 1:]
        grid = self.grid
        if grid is not None:
            shift = tuple(a - (a > dim) for a in grid.axes if a != dim)
            if dim in grid.axes:
                k = grid.axes.index(dim)
                grid = Grid(shift, np.take(grid.ids, index, axis=k))
            else:
                grid = Grid(shift, grid.ids)
            grid = _simplify(grid, dims)
        return TLabel(dims, grid)

    def slice(self, dim: int, sl: slice) -> "TLabel":
        dim %= self.ndim
        dims = list(self.dims)
        grid = self.grid
        if dims[dim] is not None:
            dims[dim] = dims[dim][sl]
        if grid is not None and dim in grid.axes:
            k = grid.axes.index(dim)
            index = [slice(None)] * grid.ids.ndim
            index[k] = sl
            grid = Grid(grid.axes, grid.ids[tuple(index)])
        return TLabel(dims, grid)

    def insert_dim(self, dim: int) -> "TLabel":
        dims = self.dims[:dim] + [None] + self.dims[dim:]
        grid = self.grid
        if grid is not None:
            grid = Grid(tuple(a + (a >= dim) for a in grid.axes), grid.ids)
        return TLabel(dims, grid)


def dim_ids(label, d: int) -> Optional[np.ndarray]:
    """The channel ids along dim ``d`` of ``label`` (a grid axis: all of the grid's ids),
    or None when the dim carries no channels or ``label`` is not a tensor label."""
    if not isinstance(label, TLabel) or d >= label.ndim:
        return None
    if label.grid is not None and d in label.grid.axes:
        return label.grid.ids.ravel()
    return label.dims[d]


def _simplify(grid: Grid, dims: List[Optional[np.ndarray]]) -> Optional[Grid]:
    """A grid left with one axis becomes a plain labeled dim (written into ``dims``)."""
    if grid.ids.ndim == 0:
        return None
    if len(grid.axes) == 1:
        dims[grid.axes[0]] = grid.ids.copy()
        return None
    return grid


@dataclass
class Record:
    """Where atomic ids live: ``ids[j]`` is the id of index j of ``target``'s ``dim``."""

    target: str
    dim: int
    ids: np.ndarray
    role: str = "tensor"
    order: int = 0
    # every layer role this dim plays ("producer", "consumer"): a weight tied to a
    # transposed use (an embedding that is also the LM head) is both, while ``role``
    # keeps the highest-ranked one, which the passes act on
    roles: set = field(default_factory=set)


@dataclass
class ChannelSpace:
    """Id allocation, edges (coupling), blocks (unsoundness) and records."""

    next_id: int = 0
    space_of: List[np.ndarray] = field(default_factory=list)  # per allocation chunk
    records: Dict[Tuple[str, int], Record] = field(default_factory=dict)
    param_labels: Dict[str, TLabel] = field(default_factory=dict)
    owners: Dict[int, str] = field(default_factory=dict)       # id(tensor) -> first name
    aliases: Dict[str, List[str]] = field(default_factory=dict)  # other names of a tensor
    edges_a: List[np.ndarray] = field(default_factory=list)
    edges_b: List[np.ndarray] = field(default_factory=list)
    blocks: List[Tuple[np.ndarray, str]] = field(default_factory=list)
    kinds: List[Tuple[np.ndarray, str]] = field(default_factory=list)
    same: List[Tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    rectangles: List[Tuple[np.ndarray, str]] = field(default_factory=list)
    rectangles_done: set = field(default_factory=set)
    n_spaces: int = 0

    def fresh(self, n: int) -> np.ndarray:
        """``n`` new ids forming one new space (one parameter dimension)."""
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        self.space_of.append(np.full(n, self.n_spaces, dtype=np.int64))
        self.n_spaces += 1
        return ids

    def param_label(self, target: str, shape: Sequence[int], tensor=None) -> TLabel:
        """Label of a parameter/buffer read by the graph; one set of ids per tensor, so
        a tensor used twice, or tied under two names, couples all its uses. ``tensor``
        (the object itself) lets a second name of a tied tensor share the first's ids."""
        if target not in self.param_labels:
            first = self.owners.setdefault(id(tensor), target) if tensor is not None else target
            if first != target:
                self._alias(target, first, shape)
            else:
                dims: List[Optional[np.ndarray]] = []
                for d, size in enumerate(shape):
                    if size > 1:
                        ids = self.fresh(size)
                        self.records[(target, d)] = Record(target, d, ids, order=len(self.records))
                        dims.append(ids)
                    else:
                        dims.append(None)
                self.param_labels[target] = TLabel(dims)
        return self.param_labels[target].copy()

    def _alias(self, target: str, first: str, shape: Sequence[int]) -> None:
        """``target`` names the same tensor as ``first``: same ids, its own records."""
        base = self.param_label(first, shape)
        for d, ids in enumerate(base.dims):
            if ids is not None:
                first_rec = self.records[(first, d)]
                self.records[(target, d)] = Record(target, d, ids, first_rec.role,
                                                   order=len(self.records),
                                                   roles=set(first_rec.roles))
        self.param_labels[target] = base
        self.aliases.setdefault(first, []).append(target)
        self.aliases.setdefault(target, []).append(first)

    def set_role(self, target: str, dim: int, role: str) -> None:
        """Upgrade a record's role (on every name of a tied tensor); a producer stays a
        producer wherever else it is used. Layer roles are also collected in
        ``Record.roles``, so a dim that is both (tied weights) is reported as both."""
        for name in [target] + self.aliases.get(target, []):
            rec = self.records.get((name, dim))
            if rec is None:
                continue
            if role in LAYER_ROLES:
                rec.roles.add(role)
            if _ROLE_RANK[role] > _ROLE_RANK[rec.role]:
                rec.role = role

    @staticmethod
    def _untracked_reason(where: str) -> str:
        return (f"channels meet, at {where}, a dim of the same size that no channel "
                "tracks (spatial positions or tokens of the input, or the output of an op "
                "the analysis does not know); removing one would change values that no "
                "parameter slice accounts for")

    def union(self, a: Optional[np.ndarray], b: Optional[np.ndarray], where: str) -> None:
        """Couple ``a[i]`` with ``b[i]``. A tracked index facing an untracked one is blocked:
        removing it would change a value that no parameter slice can account for."""
        if a is None and b is None:
            return
        if a is None or b is None:
            self.block(a if a is not None else b,
                       self._untracked_reason(where))
            return
        both = (a >= 0) & (b >= 0)
        self.edges_a.append(a[both])
        self.edges_b.append(b[both])
        lone = (a >= 0) ^ (b >= 0)
        if lone.any():
            self.block(np.where(a >= 0, a, b)[lone],
                       self._untracked_reason(where))

    def union_all(self, ids: np.ndarray) -> None:
        """Make all (tracked) ids one channel."""
        ids = ids[ids >= 0]
        if ids.size > 1:
            self.edges_a.append(np.full(ids.size - 1, ids[0]))
            self.edges_b.append(ids[1:])

    def block(self, ids: Optional[np.ndarray], reason: str) -> None:
        if ids is None:
            return
        ids = np.asarray(ids).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self.blocks.append((ids, reason))

    def block_label(self, label: Optional[TLabel], reason: str) -> None:
        if isinstance(label, TLabel):
            self.block(label.all_ids(), reason)
        elif isinstance(label, (list, tuple)):
            for item in label:
                self.block_label(item, reason)
        elif isinstance(label, dict):
            for item in label.values():
                self.block_label(item, reason)

    def mark_kind(self, ids: np.ndarray, kind: str) -> None:
        self.kinds.append((ids[ids >= 0], kind))

    def require_same(self, a: np.ndarray, b: np.ndarray, reason: str) -> None:
        """``a`` and ``b`` must end up the same channels, index by index (known only once
        all edges are in: :func:`check_same`); otherwise both are blocked."""
        self.same.append((a, b, reason))

    def check_same(self, root: np.ndarray) -> None:
        """Block the :meth:`require_same` pairs whose channels differ under ``root``."""
        for a, b, reason in self.same:
            ok = a.size == b.size and np.array_equal(a >= 0, b >= 0)
            if ok:
                tracked = a >= 0
                ok = np.array_equal(root[a[tracked]], root[b[tracked]])
            if not ok:
                self.block(a, reason)
                self.block(b, reason)

    def require_rectangular(self, ids: np.ndarray, where) -> None:
        """The grid ``ids`` (one dim split into several, ``[3*H*D] -> [3, H, D]``) must
        stay rectangular under every plan: its channels must be slabs along one axis
        (whole heads). Enforced once all edges are in (:meth:`rectangular_edges`)."""
        self.rectangles.append((ids, where))

    def rectangular_edges(self, root: np.ndarray) -> bool:
        """Make each :meth:`require_rectangular` grid whose channels (under ``root``) are
        not slabs along one axis into slabs along the axis that keeps the most channels
        (CaiT's talking heads leave q·k heads and v heads apart: they become one head).
        Tracked entries sharing a slab with untracked ones are blocked. True if edges
        were added (the caller recomputes the components)."""
        added = False
        for i, (ids, where) in enumerate(self.rectangles):
            r = np.where(ids >= 0, root[np.maximum(ids, 0)], UNTRACKED)
            if i in self.rectangles_done or (r < 0).all() or any(_slabs(r, k) for k in range(r.ndim)):
                continue
            self.rectangles_done.add(i)  # merging elsewhere only coarsens: slabs stay slabs
            k = max(range(r.ndim), key=lambda ax: (_channels_along(r, ax), -ax))
            lines = np.moveaxis(r, k, 0).reshape(r.shape[k], -1)
            mixed = (lines >= 0).any(1) & ~(lines >= 0).all(1)
            if mixed.any():
                self.block(lines[mixed], f"a reshape at {where} splits channels into "
                           "parts that are not whole slices of one axis")
            a, b = _line_edges(lines)
            self.edges_a.append(a)
            self.edges_b.append(b)
            added = True
        return added

    def collapse(self, label: TLabel) -> TLabel:
        """Turn a grid into per-dim labels: the outermost grid axis stays labeled and all
        ids sharing an index along it become one channel (whole attention heads; a single
        head, a size-1 axis, is one channel labeling a size-1 dim)."""
        if label.grid is None:
            return label
        grid = label.grid
        dims = list(label.dims)
        keep = 0
        moved = np.moveaxis(grid.ids, keep, 0).reshape(grid.ids.shape[keep], -1)
        reps = np.empty(moved.shape[0], dtype=np.int64)
        for h, row in enumerate(moved):
            tracked = row[row >= 0]
            if tracked.size and tracked.size != row.size:
                self.block(tracked, "a head mixes tracked and untracked channels")
            self.union_all(row)
            reps[h] = tracked[0] if tracked.size else UNTRACKED
        self.mark_kind(grid.ids.ravel(), "head")
        dims[grid.axes[keep]] = reps if (reps >= 0).any() else None
        return TLabel(dims)


def _slabs(r: np.ndarray, k: int) -> bool:
    """Is the channel of every entry of ``r`` a function of its index along axis ``k``?"""
    lines = np.moveaxis(r, k, 0).reshape(r.shape[k], -1)
    return bool((lines == lines[:, :1]).all())


def _line_edges(lines: np.ndarray):
    """Edges making the tracked entries of each row of ``lines`` one channel."""
    tracked = [row[row >= 0] for row in lines]
    a = [np.full(t.size - 1, t[0]) for t in tracked if t.size > 1]
    b = [t[1:] for t in tracked if t.size > 1]
    empty = np.empty(0, dtype=np.int64)
    return (np.concatenate(a) if a else empty), (np.concatenate(b) if b else empty)


def _channels_along(r: np.ndarray, k: int) -> int:
    """How many channels ``r`` keeps when made into slabs along axis ``k``."""
    values, inverse = np.unique(r[r >= 0], return_inverse=True)
    remap = np.full(r.shape, -1, dtype=np.int64)
    remap[r >= 0] = inverse
    a, b = _line_edges(np.moveaxis(remap, k, 0).reshape(r.shape[k], -1))
    roots = components(values.size, [a], [b])
    return int(np.unique(roots).size)


def components(n: int, edges_a: List[np.ndarray], edges_b: List[np.ndarray]) -> np.ndarray:
    """Connected components of ``n`` nodes: root (smallest member id) per node.

    Vectorised min-label propagation with pointer jumping; rounds grow with the log
    of the component diameter, each round is a handful of numpy passes (on int32 when
    the ids fit: half the memory traffic, twice as fast; the result is int64)."""
    dtype = np.int32 if n < 2 ** 31 else np.int64
    parent = np.arange(n, dtype=dtype)
    if not edges_a:
        return parent.astype(np.int64)
    a = np.concatenate(edges_a).astype(dtype)
    b = np.concatenate(edges_b).astype(dtype)
    while True:
        pa, pb = parent[a], parent[b]
        low = np.minimum(pa, pb)
        before = parent.copy()
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
        while True:  # pointer jumping
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
        if np.array_equal(parent, before):
            return parent.astype(np.int64)
