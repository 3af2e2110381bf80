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

from .labels import Grid, TLabel
from .rule_table import (RULES, RuleContext, as_tlabel, canonical, shape_of, target_name,
                         unknown_rule, untracked_output)
from .reshape import reshape_label
from .size_rules import check_computed_sizes
from .statistics import statistic_mean_args

# --------------------------------------------------------------------------- passthrough
_UNARY_FUNCS = [
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.tanhshrink, F.sigmoid, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.neg, torch.clamp, torch.erf, torch.sin, torch.cos, torch.square,
    torch.nn.functional.gelu, torch._C._nn.gelu, operator.neg, torch.sign,
    torch.clone, torch.detach, torch.nan_to_num,
    F.logsigmoid, F.softsign, F.softshrink, F.hardshrink, F.rrelu, F.threshold,
    torch.special.expit, torch.erfc, torch.sinc, torch.log1p, torch.expm1, torch.reciprocal,
    torch.atan, torch.floor, torch.round, torch.frac, torch.trunc, torch.logit,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "log", "sqrt", "rsqrt", "abs",
    "neg", "clamp", "clamp_", "clamp_min", "clamp_max", "float", "half", "double", "bfloat16",
    "to", "type", "type_as", "contiguous", "clone", "detach", "square", "erf", "gelu",
    "hardswish", "sign", "nan_to_num", "requires_grad_",
    "sin", "cos", "atan", "erfc", "sinc", "log1p", "expm1", "reciprocal", "floor", "round",
    "frac", "trunc", "logit",
]
_UNARY_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Tanhshrink,
    nn.LogSigmoid, nn.Softsign, nn.Softshrink, nn.Hardshrink, nn.RReLU, nn.Threshold,
]


# torchvision's stochastic depth: the identity in eval mode; in training mode it scales
# whole samples ("row") or the whole batch, never single channels
_UNARY_NAMED = ["torchvision.ops.stochastic_depth.stochastic_depth",
                "torchvision.ops.stochastic_depth.StochasticDepth"]


@RULES.function(*_UNARY_FUNCS)
@RULES.method(*_UNARY_METHODS)
@RULES.module(*_UNARY_MODULES)
@RULES.by_name(*_UNARY_NAMED)
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
    additive = canonical(ctx.node.target) in _ADDITIVE
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
        # a merge of different channels (a residual add), not x + f(x) of one tensor's
        # own channels (GPT-2's gelu: x + 0.044715 x³)
        if mark is not None and any(not np.array_equal(t, base) for t in tracked[1:]):
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
    """Reducing over a channel dim mixes channels with no parameter to slice: blocked.
    Except a statistic, ``mean(dim, keepdim=True)`` (RMSNorm's mean square, a written-out
    LayerNorm): the slim model takes it over the kept channels, as a LayerNorm over a
    pruned stream does (design §7), and the masked reference does the same
    (:mod:`.statistics`)."""
    x = ctx.node.args[0]
    label, shape = ctx.label(x), shape_of(x)
    multi = _multi_output(ctx.node)
    if shape is None or (ctx.out_shape is None and not multi):
        return untracked_output(ctx.node)
    label = ctx.space.collapse(as_tlabel(label, shape))
    reduced = _dims_arg(ctx, len(shape))
    keepdim = bool(ctx.arg(2, "keepdim", False))
    if statistic_mean_args(ctx.node) is None:
        for d in reduced:
            ctx.space.block(label.dims[d], f"reduction over channels at {ctx.where}")
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
    """Ops that normalise along one dim mix the entries along that dim only: a channel
    dim there is blocked; along a grid axis (the paths of selective-kernel attention,
    ``[B, paths, C, 1, 1]``) the entries mixed together become one channel, so the axis
    keeps its size and the other axes stay prunable; other dims pass through."""
    x = ctx.node.args[0]
    label = as_tlabel(ctx.label(x), shape_of(x))
    if ctx.node.op == "call_module":
        dim = ctx.module().dim
    else:
        dim = ctx.arg(1, "dim", 1 if canonical(ctx.node.target) is F.normalize else None)
    if dim is None:
        dim = label.ndim - 1
    dim %= label.ndim
    if label.grid is not None and dim in label.grid.axes:
        return _merge_grid_axis(ctx, label, dim)
    ctx.space.block(label.dims[dim], f"normalisation across channels at {ctx.where}")
    return label


def _merge_grid_axis(ctx: RuleContext, label: TLabel, dim: int) -> TLabel:
    """Couple the ids along grid axis ``dim`` index by index of the other axes; the axis
    then carries no channels of its own."""
    grid = label.grid
    k = grid.axes.index(dim)
    moved = np.moveaxis(grid.ids, k, -1)
    lines = moved.reshape(-1, moved.shape[-1])
    a, b = np.repeat(lines[:, :1], lines.shape[1] - 1, 1), lines[:, 1:]
    both = (a >= 0) & (b >= 0)
    ctx.space.edges_a.append(a[both])
    ctx.space.edges_b.append(b[both])
    mixed = (lines >= 0).any(1) & ~(lines >= 0).all(1)
    if mixed.any():
        ctx.space.block(lines[mixed], f"normalisation mixes tracked and untracked entries at {ctx.where}")
    reps = moved.max(-1)
    axes = tuple(a for a in grid.axes if a != dim)
    dims = list(label.dims)
    dims[dim] = None
    if len(axes) == 1:
        dims[axes[0]] = reps.copy() if (reps >= 0).any() else None
        return TLabel(dims)
    return TLabel(dims, Grid(axes, reps))


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


@RULES.method("permute", "transpose", "t", "swapaxes", "movedim")
@RULES.function(torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t)
def permute_rule(ctx: RuleContext):
    x = ctx.node.args[0]
    label = as_tlabel(ctx.label(x), shape_of(x))
    nd = label.ndim
    name = target_name(ctx.node)
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
    name = target_name(ctx.node)
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
@RULES.function(getattr)
def getattr_rule(ctx: RuleContext):
    """``x.T`` / ``x.mT`` / ``x.H`` / ``x.mH`` of a tensor are permutes (they were read
    as metadata, which lost the channels: a consumer of ``w.T`` then coupled nothing);
    ``x.data`` is ``x``; any other tensor-valued attribute of a channel-carrying tensor
    fails closed. Metadata (``x.shape``, ``x.dtype``) and attributes of non-tensors
    (a model output's ``.logits``) carry no channels, as before."""
    x, name = ctx.node.args[0], ctx.node.args[1] if len(ctx.node.args) > 1 else None
    label = as_tlabel(ctx.label(x), shape_of(x))
    if shape_of(ctx.node) is None or label is None or not isinstance(name, str):
        return untracked_output(ctx.node)
    nd = label.ndim
    if name in ("T", "H") or (name in ("mT", "mH") and nd >= 2):
        perm = list(range(nd))[::-1] if name in ("T", "H") else list(range(nd - 2)) + [nd - 1, nd - 2]
        return label.permute(perm)
    if name == "data":
        return label
    if label.labeled():
        return unknown_rule(ctx)
    return untracked_output(ctx.node)


@RULES.function(torch._assert, operator.eq, operator.ne, operator.lt, operator.gt,
                operator.le, operator.ge, operator.mod, operator.and_,
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
