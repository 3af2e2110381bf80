"""Channel rules for concat, split and indexing (offsets along channel dims)."""
from __future__ import annotations

import operator

import numpy as np
import torch

from .labels import UNTRACKED, TLabel
from .rule_table import RULES, RuleContext, as_tlabel, shape_of, target_name, untracked_output
from .tensor_rules import broadcast_labels


@RULES.function(torch.cat, torch.concat, torch.concatenate)
def cat_rule(ctx: RuleContext):
    """Concatenation: the cat dim is the inputs' ids at their offsets; every other dim
    couples across inputs like an elementwise op."""
    tensors = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs["tensors"]
    dim = ctx.arg(1, "dim", 0)
    parts = [(as_tlabel(ctx.label(t), shape_of(t)), shape_of(t)) for t in tensors]
    out_shape = ctx.out_shape
    dim %= len(out_shape)
    # Non-cat dims: couple like an elementwise op over inputs with nothing along the cat dim.
    flat = [(_without_dim(ctx, lab, dim), shp[:dim] + (1,) + shp[dim + 1:]) for lab, shp in parts]
    merged = broadcast_labels(ctx, flat, out_shape[:dim] + (1,) + out_shape[dim + 1:])
    pieces = []
    for lab, shp in parts:
        ids = ctx.space.collapse(lab).dims[dim]
        pieces.append(ids if ids is not None else np.full(shp[dim], UNTRACKED, dtype=np.int64))
    cat_ids = np.concatenate(pieces)
    merged.dims[dim] = cat_ids if (cat_ids >= 0).any() else None
    return merged


def _without_dim(ctx: RuleContext, label: TLabel, dim: int) -> TLabel:
    if label is None:
        return None
    label = ctx.space.collapse(label)
    return TLabel([None if d == dim else lab for d, lab in enumerate(label.dims)])


@RULES.function(torch.stack)
def stack_rule(ctx: RuleContext):
    tensors = ctx.node.args[0]
    dim = ctx.arg(1, "dim", 0)
    parts = [(as_tlabel(ctx.label(t), shape_of(t)), shape_of(t)) for t in tensors]
    in_shape = parts[0][1]
    merged = broadcast_labels(ctx, parts, in_shape)
    dim %= len(in_shape) + 1
    return merged.insert_dim(dim)


@RULES.method("split", "chunk", "tensor_split", "unbind", "split_with_sizes")
@RULES.function(torch.split, torch.chunk, torch.tensor_split, torch.unbind)
def split_rule(ctx: RuleContext):
    """Split along a dim: each output gets its slice of ids (a grid axis stays a grid).
    ``unbind`` along a plain channel dim would pick single channels: blocked."""
    x = ctx.node.args[0]
    label, shape = as_tlabel(ctx.label(x), shape_of(x)), shape_of(x)
    name = target_name(ctx.node)
    metas = ctx.node.meta.get("tensor_meta") or ()
    default_dim = 0
    dim = ctx.arg(1 if name == "unbind" else 2, "dim", default_dim) % len(shape)
    if name == "unbind":
        if label.dims[dim] is not None:
            ctx.space.block(label.dims[dim], f"unbind picks single channels at {ctx.where}")
            label = TLabel([None if d == dim else lab for d, lab in enumerate(label.dims)], label.grid)
        return [label.select(dim, i) for i in range(shape[dim])]
    sizes = [int(m.shape[dim]) for m in metas]
    outs, start = [], 0
    for size in sizes:
        outs.append(label.slice(dim, slice(start, start + size)))
        start += size
    return outs


@RULES.function(operator.getitem)
def getitem_rule(ctx: RuleContext):
    container, index = ctx.node.args[0], ctx.node.args[1]
    label = ctx.label(container)
    if isinstance(label, (list, tuple)) and isinstance(index, int):
        return label[index]
    if isinstance(label, TLabel):
        return index_tensor(ctx, label, shape_of(container), index)
    if shape_of(container) is not None:  # a tensor with no label (e.g. from metadata)
        return index_tensor(ctx, TLabel.untracked(len(shape_of(container))),
                            shape_of(container), index)
    return untracked_output(ctx.node)


def index_tensor(ctx: RuleContext, label: TLabel, shape, index):
    """Basic/advanced indexing. Partial slices and integer picks along a plain channel
    dim are blocked (the literal indices would go stale); along a grid axis (q/k/v
    picked out of a fused qkv) they are structural and allowed."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        fill = len(shape) - (len(items) - 1 - sum(i is None for i in items))
        items = items[:k] + [slice(None)] * fill + items[k + 1:]
    dim = in_dim = 0  # position in the label being built / in the input shape
    for item in items:
        if item is None:
            label = label.insert_dim(dim)
            dim += 1
            continue
        if isinstance(item, int):
            label = _pick(ctx, label, dim, item)
        elif isinstance(item, slice):
            label = _slice(ctx, label, dim, item, shape[in_dim], ctx.out_shape[dim])
            dim += 1
        else:  # tensor / list index: gathers, replacing the dim by the index's dims
            label = ctx.space.collapse(label)
            ctx.space.block(label.dims[dim], f"gather along channels at {ctx.where}")
            index_ndim = len(shape_of(item)) if shape_of(item) is not None else 1
            label = TLabel(label.dims[:dim] + [None] * index_ndim + label.dims[dim + 1:])
            dim += index_ndim
        in_dim += 1
    out_shape = ctx.out_shape
    if out_shape is None or label.ndim != len(out_shape):
        ctx.space.block_label(label, f"unsupported indexing at {ctx.where}")
        return untracked_output(ctx.node)
    return label


def _in_grid(label: TLabel, dim: int) -> bool:
    return label.grid is not None and dim in label.grid.axes


def _pick(ctx: RuleContext, label: TLabel, dim: int, item: int) -> TLabel:
    if not _in_grid(label, dim) and label.dims[dim] is not None:
        ctx.space.block(label.dims[dim], f"indexing picks one channel at {ctx.where}")
    return label.select(dim, item)


def _slice(ctx: RuleContext, label: TLabel, dim: int, item: slice, size: int,
           out_size: int) -> TLabel:
    # Bounds may be FX nodes (x[:, :H]); the propagated output size tells if it is full.
    if out_size == size:
        return label
    if not all(isinstance(v, (int, type(None))) for v in (item.start, item.stop, item.step)):
        ctx.space.block_label(label, f"a slice with computed bounds at {ctx.where}")
        label = ctx.space.collapse(label)
        label.dims[dim] = None
        return label
    if not _in_grid(label, dim) and label.dims[dim] is not None:
        ctx.space.block(label.dims[dim], f"a partial slice of channels at {ctx.where}")
    return label.slice(dim, item)
