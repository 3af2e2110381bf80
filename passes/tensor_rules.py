"""Channel rules for parameter-free tensor ops: elementwise, reductions, shape ops,
concat/split, indexing, matmul/attention, spatial ops. See :mod:`.rule_table`."""
from __future__ import annotations

import math
import operator
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .labels import TLabel, dim_ids
from .rule_table import RULES, RuleContext, as_tlabel, shape_of, untracked_output
from .reshape import reshape_label

# --------------------------------------------------------------------------- passthrough
_UNARY_FUNCS = [
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.tanhshrink, F.sigmoid, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.neg, torch.clamp, torch.erf, torch.sin, torch.cos, torch.square,
    torch.nn.functional.gelu, torch._C._nn.gelu, operator.neg, torch.sign,
    torch.clone, torch.detach, torch.nan_to_num,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "log", "sqrt", "rsqrt", "abs",
    "neg", "clamp", "clamp_", "clamp_min", "clamp_max", "float", "half", "double", "bfloat16",
    "to", "type", "type_as", "contiguous", "clone", "detach", "square", "erf", "gelu",
    "hardswish", "sign", "nan_to_num", "requires_grad_",
]
_UNARY_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Tanhshrink,
]


@RULES.function(*_UNARY_FUNCS)
@RULES.method(*_UNARY_METHODS)
@RULES.module(*_UNARY_MODULES)
def passthrough_rule(ctx: RuleContext):
    """Output channel i is a function of input channel i only."""
    first = ctx.node.args[0] if ctx.node.args else next(iter(ctx.node.kwargs.values()))
    label = ctx.label(first)
    shape = ctx.out_shape
    if isinstance(label, TLabel) and shape is not None and label.ndim == len(shape):
        return label
    return untracked_output(ctx.node)


# --------------------------------------------------------------------------- elementwise
_BINARY_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.pow, operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow,
    torch.where, torch.lerp, torch.addcmul, torch.true_divide, torch.masked_fill,
]
_BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
    "masked_fill", "masked_fill_", "where", "lerp", "addcmul",
]


@RULES.function(*_BINARY_FUNCS)
@RULES.method(*_BINARY_METHODS)
def elementwise_rule(ctx: RuleContext):
    """Broadcasting n-ary op: equal non-1 sizes along a dim couple index by index;
    a size-1 (broadcast) dim couples nothing."""
    out_shape = ctx.out_shape
    if out_shape is None:
        return None
    tensors = [(as_tlabel(lab, shp), shp) for lab, shp in ctx.tensor_args()]
    if len(tensors) == 1 and tuple(tensors[0][1]) == out_shape:
        return tensors[0][0]  # tensor (op) scalar keeps grids intact
    additive = ctx.node.target in _ADDITIVE
    return broadcast_labels(ctx, tensors, out_shape, mark="stream" if additive else None)


_ADDITIVE = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
             "add", "add_", "sub", "sub_"}


def broadcast_labels(ctx: RuleContext, tensors, out_shape, mark: Optional[str] = None) -> TLabel:
    """Couple equal-size dims across ``tensors``; ``mark`` names the group kind of
    channels that two or more tracked operands merge into (``"stream"`` for a residual add)."""
    nd = len(out_shape)
    dims: List[Optional[np.ndarray]] = [None] * nd
    for d in range(nd):
        base = None
        sizes = []
        for label, shape in tensors:
            if label is None or shape is None:
                continue
            label = ctx.space.collapse(label)
            k = d - (nd - len(shape))
            if k < 0 or (shape[k] == 1 and out_shape[d] != 1):
                continue  # broadcast: couples nothing (size 1 everywhere is no broadcast)
            sizes.append(label.dims[k])
        tracked = [s for s in sizes if s is not None]
        if not tracked:
            continue
        base = tracked[0]
        for other in sizes:
            if other is not base:
                ctx.space.union(base, other, ctx.where)
        if mark is not None and len(tracked) > 1:
            ctx.space.mark_kind(base, mark)
        dims[d] = base
    return TLabel(dims)


# --------------------------------------------------------------------------- reductions
def _dims_arg(ctx: RuleContext, ndim: int, index: int = 1, name: str = "dim"):
    dim = ctx.arg(index, name)
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        return [dim % ndim]
    return [d % ndim for d in dim]


def _multi_output(node) -> bool:
    """Does the node return several tensors? ``TensorMetadata`` is itself a NamedTuple,
    so a tuple check alone would mistake every single-tensor output for a pair."""
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, (tuple, list)) and not hasattr(meta, "shape")


@RULES.method("mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp", "max", "min", "prod")
@RULES.function(torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std,
                torch.logsumexp, torch.prod)
def reduce_rule(ctx: RuleContext):
    """Reducing over a channel dim mixes channels with no parameter to slice: blocked."""
    x = ctx.node.args[0]
    label, shape = ctx.label(x), shape_of(x)
    multi = _multi_output(ctx.node)
    if shape is None or (ctx.out_shape is None and not multi):
        return untracked_output(ctx.node)
    label = ctx.space.collapse(as_tlabel(label, shape))
    reduced = _dims_arg(ctx, len(shape))
    for d in reduced:
        ctx.space.block(label.dims[d], f"reduction over channels at {ctx.where}")
    keepdim = bool(ctx.arg(2, "keepdim", False))
    dims = [None if (d in reduced) else lab for d, lab in enumerate(label.dims)]
    if not keepdim:
        dims = [lab for d, lab in enumerate(dims) if d not in reduced]
    out = TLabel(dims)
    if multi:  # max(dim) -> (values, indices)
        return [out, out]
    return out if out.ndim == len(ctx.out_shape) else untracked_output(ctx.node)


@RULES.method("softmax", "log_softmax", "cumsum")
@RULES.function(F.softmax, F.log_softmax, torch.softmax, torch.cumsum, F.normalize)
@RULES.module(nn.Softmax, nn.LogSoftmax)
def normalize_rule(ctx: RuleContext):
    """Ops that normalise along one dim: a channel dim there is blocked."""
    x = ctx.node.args[0]
    label = ctx.space.collapse(as_tlabel(ctx.label(x), shape_of(x)))
    if ctx.node.op == "call_module":
        dim = ctx.module().dim
    else:
        dim = ctx.arg(1, "dim", 1 if ctx.node.target is F.normalize else None)
    if dim is None:
        dim = label.ndim - 1
    ctx.space.block(label.dims[dim % label.ndim], f"normalisation across channels at {ctx.where}")
    return label


# --------------------------------------------------------------------------- shape ops
@RULES.method("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as",
              "squeeze", "unsqueeze")
@RULES.function(torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten)
@RULES.module(nn.Flatten, nn.Unflatten)
def reshape_rule(ctx: RuleContext):
    x = ctx.node.args[0]
    label = as_tlabel(ctx.label(x), shape_of(x))
    if label is None or ctx.out_shape is None:
        return untracked_output(ctx.node)
    out = reshape_label(ctx.space, label, shape_of(x), ctx.out_shape, ctx.where)
    check_computed_sizes(ctx, out)
    return out


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
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
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
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
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


@RULES.method("permute", "transpose", "t", "swapaxes", "movedim")
@RULES.function(torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t)
def permute_rule(ctx: RuleContext):
    x = ctx.node.args[0]
    label = as_tlabel(ctx.label(x), shape_of(x))
    nd = label.ndim
    name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    rest = list(ctx.node.args[1:])
    if name == "permute":
        perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        perm = list(perm or ctx.node.kwargs.get("dims"))
    elif name == "movedim":
        src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
        order = [d for d in range(nd) if d != src % nd]
        order.insert(dst % nd, src % nd)
        perm = order
    else:
        a, b = (rest + [0, 1])[:2] if name != "t" else (0, 1)
        perm = list(range(nd))
        perm[a % nd], perm[b % nd] = perm[b % nd], perm[a % nd]
    return label.permute(perm)


@RULES.method("expand", "expand_as", "broadcast_to")
@RULES.function(torch.broadcast_to)
def expand_rule(ctx: RuleContext):
    """Broadcast a tensor to a larger shape: expanded (size-1) dims carry nothing."""
    x = ctx.node.args[0]
    label, in_shape = as_tlabel(ctx.label(x), shape_of(x)), shape_of(x)
    out = ctx.out_shape
    dims = [None] * (len(out) - len(in_shape)) + list(ctx.space.collapse(label).dims)
    check_computed_sizes(ctx, TLabel(dims))
    return TLabel(dims)


@RULES.method("repeat", "tile", "repeat_interleave", "roll", "flip")
@RULES.function(torch.roll, torch.flip, torch.tile, torch.repeat_interleave)
def repeat_rule(ctx: RuleContext):
    """Ops that move or copy indices along dims: a channel dim along them is blocked."""
    x = ctx.node.args[0]
    label = ctx.space.collapse(as_tlabel(ctx.label(x), shape_of(x)))
    out_shape, in_shape = ctx.out_shape, shape_of(x)
    name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    if name in ("roll", "flip"):
        dims = ctx.arg(2 if name == "roll" else 1, "dims")
        touched = range(label.ndim) if dims is None else ([dims] if isinstance(dims, int) else dims)
        touched = [d % label.ndim for d in touched]
    else:
        touched = [d for d in range(label.ndim) if len(out_shape) != len(in_shape)
                   or out_shape[d] != in_shape[d]] if out_shape else range(label.ndim)
    for d in touched:
        ctx.space.block(label.dims[d], f"indices moved along channels at {ctx.where}")
    if out_shape is None or len(out_shape) != label.ndim:
        return untracked_output(ctx.node)
    return TLabel([None if d in touched else lab for d, lab in enumerate(label.dims)])


# --------------------------------------------------------------------------- metadata / creation
@RULES.function(getattr, torch._assert, operator.eq, operator.ne, operator.lt, operator.gt,
                operator.le, operator.ge, operator.floordiv, operator.mod, operator.and_,
                operator.or_, operator.not_, len, math.sqrt, int, float)
@RULES.method("size", "dim", "numel", "new_zeros", "new_ones", "new_empty", "new_full",
              "new_tensor", "zero_", "fill_", "bernoulli_", "bernoulli", "nelement")
@RULES.function(torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
                torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                torch.rand_like, torch.randn_like, torch.linspace, torch.eye)
def metadata_rule(ctx: RuleContext):
    """Shape queries and tensor factories: outputs carry no channels. Reading a size
    is safe: the rewritten graph recomputes it."""
    return untracked_output(ctx.node)
