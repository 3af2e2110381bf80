"""Sizes computed at run time in view/reshape/expand (``x.reshape(B, N, 3, H, C // H)``
with ``C = h.shape[-1]``): which of them the rewrite keeps in step with pruning, and
which channels they freeze. Used by the shape-op rules of :mod:`.tensor_rules`."""
from __future__ import annotations

import math
import operator

import torch

from .labels import TLabel, dim_ids
from .rule_table import RuleContext, shape_of, target_name


# ------------------------------------------------------------- sizes computed at run time
# ``x.reshape(B, N, 3, H, C // H)`` with ``C = h.shape[-1]``: a size read from another
# tensor's shape follows *that* tensor's pruning. Where such a size (positional
# argument of view/reshape/expand) sizes a dim that carries channels, the rewrite
# replaces it (rewrite._patch_shape_args): the size of a channel dim does not depend on
# the input, so it becomes -1 (inferred) or the kept size as a literal, and the tensors
# it was read from stay free to prune (BEiT's ``reshape(B, N, C)`` of its heads with the
# stream's C). Sizes of dims without channels must not change under pruning: the
# channels they are read from are blocked (fail closed). ``x.view(t.shape)`` is sound
# only when t's dims carry the very channels of the output (checked once all edges are in).
_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv,
                    operator.truediv, operator.mod, operator.neg, int, math.sqrt}


def _shape_read(node: torch.fx.Node):
    """(tensor, dim) when ``node`` is ``t.shape[k]``, ``t.size(k)`` or ``t.size()[k]``."""
    if node.op in ("call_method", "call_function") and target_name(node) == "size" \
            and len(node.args) == 2:  # (also aten.sym_size.int)
        return (node.args[0], node.args[1]) if isinstance(node.args[1], int) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        base = node.args[0]
        if isinstance(base, torch.fx.Node) and (
                (base.op == "call_function" and base.target is getattr and base.args[1] == "shape")
                or (base.op == "call_method" and base.target == "size" and len(base.args) == 1)):
            return base.args[0], node.args[1]
    return None


def _size_sources(value):
    """The (tensor, dim) shape reads a computed size depends on; None if it depends on
    anything else (a data-dependent value, an unknown function)."""
    if isinstance(value, (int, float)):
        return []
    if not isinstance(value, torch.fx.Node):
        return None
    read = _shape_read(value)
    if read is not None:
        return [read]
    if value.op != "call_function" or value.target not in _SIZE_ARITHMETIC:
        return None
    out = []
    for a in value.args:
        sources = _size_sources(a)
        if sources is None:
            return None
        out += sources
    return out


def _size_args(ctx: RuleContext) -> list:
    """Target sizes of a view/reshape/expand/broadcast_to, one per output dim ([] else)."""
    node = ctx.node
    name = target_name(node)
    if name not in ("view", "reshape", "expand", "broadcast_to"):
        return []
    sizes = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    whole = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], torch.fx.Node) else None
    if whole is not None and _whole_shape_of(whole) is not None:  # x.view(y.shape)
        t = _whole_shape_of(whole)
        sizes = [_ShapeRead(t, k) for k in range(len(shape_of(t) or ()))]
    return sizes


class _ShapeRead:
    """``t.shape[k]`` read implicitly (``x.view(t.shape)``)."""

    def __init__(self, t: torch.fx.Node, k: int):
        self.t, self.k, self.name = t, k, f"{t.name}.shape[{k}]"


def _whole_shape_of(node: torch.fx.Node):
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return node.args[0]
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1:
        return node.args[0]
    return None


def check_computed_sizes(ctx: RuleContext, out: TLabel) -> None:
    """Block the channels of output dims sized by a run-time value that the rewrite
    cannot keep in step, and the channels that value is read from."""
    positional = len(ctx.node.args) > 1  # the rewrite patches positional sizes only
    for d, size in enumerate(_size_args(ctx)):
        if isinstance(size, _ShapeRead):
            sources, exact = [(size.t, size.k)], True
        elif isinstance(size, torch.fx.Node) and shape_of(size) is None:
            sources, exact = _size_sources(size), _shape_read(size) is not None
        else:
            continue
        out_ids = dim_ids(out, d)
        src_ids = [dim_ids(ctx.label(t), k % max(len(shape_of(t) or ()), 1))
                   for t, k in sources or ()]
        fixed = out_ids is None or _inner_grid_axis(out, d)  # pruning keeps its size
        reason = f"a size computed at run time (node `{size.name}`) sizes channels at {ctx.where}"
        if sources is None:  # derived from something other than shapes: assume it may change
            ctx.space.block(out_ids, reason)
            continue
        if out_ids is not None and positional and not isinstance(size, _ShapeRead):
            continue  # a channel dim: the rewrite writes its kept size (or -1)
        if fixed and all(ids is None for ids in src_ids):
            continue  # a constant under pruning, sizing a dim pruning does not resize
        if exact and not fixed and src_ids[0] is not None:
            ctx.space.require_same(src_ids[0], out_ids, reason)  # decided once all edges are in
            continue
        if not fixed:
            ctx.space.block(out_ids, reason)
        for ids in src_ids:
            ctx.space.block(ids, reason)
        if fixed and out_ids is not None and any(ids is not None for ids in src_ids):
            ctx.space.block(out_ids, reason)


def _inner_grid_axis(label: TLabel, d: int) -> bool:
    """A grid axis other than the outermost: whole heads are pruned along the outermost
    axis, so the others (head_dim) keep their size."""
    return label.grid is not None and d in label.grid.axes and d != label.grid.axes[0]
