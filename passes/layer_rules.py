"""Channel rules for parameter layers, norms, attention and spatial ops.

Module rules and their functional twins share one implementation: a module rule
looks up the parameter labels by qualified name (``layer1.conv.weight``), a
functional rule gets them from ``get_attr`` arguments. Parameters are labeled
once per tensor, so tied weights couple every use.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .labels import TLabel
from .rule_table import (RULES, RuleContext, as_tlabel, canonical, shape_of, target_name,
                         unknown_rule)
from .tensor_rules import broadcast_labels
from .weight_rules import Param, weight_param

#: Parameter layers: the module types whose weights produce and consume channels
#: (convolutions of every rank, transposed too, and Linear). The one list of them.
LAYER_MODULES = (nn.Linear, nn.modules.conv._ConvNd)


def _module_params(ctx: RuleContext, *names: str):
    mod = ctx.module()
    out = []
    for name in names:
        tensor = mod
        for part in name.split("."):
            tensor = getattr(tensor, part, None)
        if isinstance(tensor, torch.Tensor):
            out.append(Param(ctx, None, f"{ctx.node.target}.{name}", tuple(tensor.shape), tensor))
        else:
            out.append(Param(ctx, None))
    return out


def _input(ctx: RuleContext) -> TLabel:
    x = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs["input"]
    return ctx.space.collapse(as_tlabel(ctx.label(x), shape_of(x)))


# --------------------------------------------------------------------------- conv
def conv_core(ctx: RuleContext, x: TLabel, w: Param, b: Param, groups: int, transposed: bool):
    """Conv: input channels couple with the weight's input dim; output channels are the
    weight's output dim. A grouped conv is pruned in whole conv groups: group k's
    input channels, output channels and weight rows form one channel unit."""
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    out_ids = w.dim(out_dim)
    w.role(out_dim, "producer")
    if b.label is not None:
        ctx.space.union(out_ids, b.dim(0), ctx.where)
        b.role(0, "bias")
    if groups == 1:
        ctx.space.union(x.dims[1], w.dim(in_dim), ctx.where)
        w.role(in_dim, "consumer")
    elif transposed:
        ctx.space.block_label(x, f"grouped transposed conv at {ctx.where}")
        ctx.space.block(out_ids, f"grouped transposed conv at {ctx.where}")
    elif x.dims[1] is None or out_ids is None:
        ctx.space.block(out_ids, f"grouped conv over untracked channels at {ctx.where}")
    else:
        units = np.concatenate([x.dims[1].reshape(groups, -1), out_ids.reshape(groups, -1)], 1)
        ctx.space.edges_a.append(np.repeat(units[:, 0], units.shape[1] - 1))
        ctx.space.edges_b.append(units[:, 1:].reshape(-1))
        if units.shape[1] > 2:
            ctx.space.mark_kind(units.reshape(-1), "conv-group")
    for d in range(2, x.ndim):
        if x.dims[d] is not None:  # (the reason is only formatted when there is a block)
            ctx.space.block(x.dims[d], f"conv over a channel-carrying spatial dim at {ctx.where}")
    return TLabel([x.dims[0], out_ids] + [None] * (x.ndim - 2))


@RULES.module(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d)
def conv_module_rule(ctx: RuleContext):
    mod = ctx.module()
    w, b = _module_params(ctx, "weight", "bias")
    return conv_core(ctx, _input(ctx), w, b, mod.groups, mod.transposed)


@RULES.function(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                F.conv_transpose3d)
def conv_function_rule(ctx: RuleContext):
    transposed = "transpose" in target_name(ctx.node)
    w = weight_param(ctx, ctx.arg(1, "weight"))
    b = Param(ctx, ctx.arg(2, "bias"))
    groups = ctx.arg(6, "groups", 1)  # index 6 in conv and conv_transpose alike
    return conv_core(ctx, _input(ctx), w, b, groups, transposed)


# --------------------------------------------------------------------------- linear
def linear_core(ctx: RuleContext, x: TLabel, w: Param, b: Param, out_dim: int = 0) -> TLabel:
    """``x @ Wᵀ + b`` for ``W`` stored ``[out, in]`` (``out_dim=0``, torch's layout) or
    ``[in, out]`` (``out_dim=1``: Hugging Face's ``Conv1D``, ``addmm(b, x, W)``)."""
    in_dim = 1 - out_dim
    ctx.space.union(x.dims[-1], w.dim(in_dim), ctx.where)
    w.role(in_dim, "consumer")
    w.role(out_dim, "producer")
    if b.label is not None:
        ctx.space.union(w.dim(out_dim), b.dim(0), ctx.where)
        b.role(0, "bias")
    return TLabel(x.dims[:-1] + [w.dim(out_dim)])


@RULES.module(nn.Linear)
def linear_module_rule(ctx: RuleContext):
    w, b = _module_params(ctx, "weight", "bias")
    return linear_core(ctx, _input(ctx), w, b)


@RULES.function(F.linear, torch._C._nn.linear)
def linear_function_rule(ctx: RuleContext):
    return linear_core(ctx, _input(ctx), weight_param(ctx, ctx.arg(1, "weight")),
                       Param(ctx, ctx.arg(2, "bias")))


@RULES.module(nn.Embedding)
def embedding_module_rule(ctx: RuleContext):
    (w,) = _module_params(ctx, "weight")
    w.role(1, "producer")
    return TLabel(list(_input(ctx).dims) + [w.dim(1)])


# --------------------------------------------------------------------------- norms
def _couple_affine(ctx: RuleContext, ids, params, role="norm"):
    for p in params:
        if p.label is not None:
            ctx.space.union(ids, p.dim(0), ctx.where)
            p.role(0, role)


@RULES.module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def batchnorm_module_rule(ctx: RuleContext):
    x = _input(ctx)
    _couple_affine(ctx, x.dims[1], _module_params(ctx, "weight", "bias", "running_mean", "running_var"))
    return x


@RULES.function(F.batch_norm, F.instance_norm)
def batchnorm_function_rule(ctx: RuleContext):
    x = _input(ctx)
    names = [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]
    _couple_affine(ctx, x.dims[1], [Param(ctx, ctx.arg(i, n)) for i, n in names])
    return x


def layernorm_core(ctx: RuleContext, x: TLabel, k: int, w: Param, b: Param) -> TLabel:
    """LayerNorm over the last ``k`` dims: its affine entries couple with them. Its
    statistics run across those channels; the verifier accounts for that (design §7)."""
    for i in range(k):
        for p in (w, b):
            if p.label is not None:
                ctx.space.union(x.dims[x.ndim - k + i], p.dim(i), ctx.where)
                p.role(i, "norm")
    return x


@RULES.module(nn.LayerNorm)
def layernorm_module_rule(ctx: RuleContext):
    w, b = _module_params(ctx, "weight", "bias")
    return layernorm_core(ctx, _input(ctx), len(ctx.module().normalized_shape), w, b)


@RULES.function(F.layer_norm)
def layernorm_function_rule(ctx: RuleContext):
    shape = ctx.arg(1, "normalized_shape")
    return layernorm_core(ctx, _input(ctx), len(shape), Param(ctx, ctx.arg(2, "weight")),
                          Param(ctx, ctx.arg(3, "bias")))


def groupnorm_core(ctx: RuleContext, x: TLabel, num_groups: int, w: Param, b: Param) -> TLabel:
    """GroupNorm statistics run over whole norm groups, so it is pruned in whole groups.
    One group (``GroupNorm(1, C)``, PoolFormer) is a LayerNorm over (C, H, W) with a
    per-channel affine: its channels are pruned one by one like a LayerNorm's, and the
    verifier computes the statistics over the kept channels (design §7)."""
    ids = x.dims[1]
    if ids is not None and 1 < num_groups < ids.size:
        units = ids.reshape(num_groups, -1)
        ctx.space.edges_a.append(np.repeat(units[:, 0], units.shape[1] - 1))
        ctx.space.edges_b.append(units[:, 1:].reshape(-1))
    _couple_affine(ctx, ids, [w, b])
    return x


@RULES.module(nn.GroupNorm)
def groupnorm_module_rule(ctx: RuleContext):
    w, b = _module_params(ctx, "weight", "bias")
    return groupnorm_core(ctx, _input(ctx), ctx.module().num_groups, w, b)


@RULES.function(F.group_norm)
def groupnorm_function_rule(ctx: RuleContext):
    return groupnorm_core(ctx, _input(ctx), ctx.arg(1, "num_groups"),
                          Param(ctx, ctx.arg(2, "weight")), Param(ctx, ctx.arg(3, "bias")))


@RULES.module(nn.PReLU)
def prelu_module_rule(ctx: RuleContext):
    x = _input(ctx)
    if ctx.module().num_parameters > 1:
        _couple_affine(ctx, x.dims[1], _module_params(ctx, "weight"))
    return x


# --------------------------------------------------------------------------- products
@RULES.function(torch.matmul, operator.matmul, torch.bmm, torch.mm)
@RULES.method("matmul", "bmm", "mm")
def matmul_rule(ctx: RuleContext):
    """a[..., M, K] @ b[..., K, N]: batch dims broadcast-couple, K couples a with b."""
    a_node, b_node = ctx.node.args[0], ctx.node.args[1]
    a, b = Param(ctx, a_node), Param(ctx, b_node)
    sa, sb = shape_of(a_node), shape_of(b_node)
    if len(sa) < 2 or len(sb) < 2:
        return unknown_rule(ctx)
    la, lb = ctx.space.collapse(a.label), ctx.space.collapse(b.label)
    ctx.space.union(la.dims[-1], lb.dims[-2], ctx.where)
    a.role(-1, "consumer"); b.role(-2, "consumer"); b.role(-1, "producer"); a.role(-2, "producer")
    batch = broadcast_labels(ctx, [(TLabel(la.dims[:-2]), sa[:-2]), (TLabel(lb.dims[:-2]), sb[:-2])],
                             ctx.out_shape[:-2])
    return TLabel(batch.dims + [la.dims[-2], lb.dims[-1]])


@RULES.function(F.scaled_dot_product_attention)
def sdpa_rule(ctx: RuleContext):
    """softmax(q kᵀ) v per head: heads couple across q, k, v; q's and k's feature dims
    are contracted together; the output has q's rows and v's features."""
    nodes = [ctx.arg(i, n) for i, n in enumerate(("query", "key", "value"))]
    q, k, v = (ctx.space.collapse(as_tlabel(ctx.label(n), shape_of(n))) for n in nodes)
    shapes = [shape_of(n) for n in nodes]
    ctx.space.union(q.dims[-1], k.dims[-1], ctx.where)
    ctx.space.union(k.dims[-2], v.dims[-2], ctx.where)
    batch = broadcast_labels(ctx, [(TLabel(l.dims[:-2]), s[:-2]) for l, s in zip((q, k, v), shapes)],
                             ctx.out_shape[:-2])
    mask = ctx.arg(3, "attn_mask")
    if isinstance(mask, torch.fx.Node):
        scores_shape = ctx.out_shape[:-1] + (shapes[1][-2],)
        broadcast_labels(ctx, [(TLabel(batch.dims + [q.dims[-2], None]), scores_shape),
                               (as_tlabel(ctx.label(mask), shape_of(mask)), shape_of(mask))],
                         scores_shape)
    return TLabel(batch.dims + [q.dims[-2], v.dims[-1]])


@RULES.module(nn.MultiheadAttention)
def mha_module_rule(ctx: RuleContext):
    """nn.MultiheadAttention computes heads inside one opaque call and ties its embed dim
    to its input: fail closed (its MLP neighbours stay prunable). Its projections still
    show up in the report: ``in_proj`` rows form one (blocked) group, and the embed dim
    (query columns of ``in_proj``, rows of ``out_proj``, the output) joins the stream."""
    out = unknown_rule(ctx)
    query = ctx.label(ctx.arg(0, "query"))
    in_w, in_b, out_w, out_b = _module_params(ctx, "in_proj_weight", "in_proj_bias",
                                              "out_proj.weight", "out_proj.bias")
    for w, b in ((in_w, in_b), (out_w, out_b)):
        if w.label is not None:
            w.role(0, "producer")
            if b.label is not None:
                ctx.space.union(w.dim(0), b.dim(0), ctx.where)
                b.role(0, "bias")
    if isinstance(query, TLabel) and in_w.label is not None:
        ctx.space.union(ctx.space.collapse(query).dims[-1], in_w.dim(1), ctx.where)
        in_w.role(1, "consumer")
    if isinstance(out, list) and out and isinstance(out[0], TLabel) and out_w.label is not None:
        out[0] = TLabel(out[0].dims[:-1] + [out_w.dim(0)])
    return out


# --------------------------------------------------------------------------- spatial
_SPATIAL = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.Upsample: 2, nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2,
    nn.ZeroPad2d: 2, nn.ReflectionPad2d: 2, nn.ReplicationPad2d: 2, nn.ConstantPad2d: 2,
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.interpolate: 2, torch._C._nn.avg_pool2d: 2, torch._C._nn.adaptive_avg_pool2d: 2,
}


def spatial_rule(ctx: RuleContext):
    """Pooling, resizing, padding act on the trailing spatial dims only."""
    x = _input(ctx)
    if ctx.node.op == "call_module":
        # a subclass (timm's AvgPool2dSame) has its base class's spatial rank
        rank = next(_SPATIAL[c] for c in type(ctx.module()).__mro__ if c in _SPATIAL)
        touched = range(x.ndim - rank, x.ndim)
    elif canonical(ctx.node.target) is F.pad:
        pad = ctx.arg(1, "pad")  # pairs from the last dim backwards; (0, 0) leaves a dim alone
        touched = [x.ndim - 1 - i for i in range(len(pad) // 2)
                   if not (pad[2 * i] == 0 and pad[2 * i + 1] == 0)]
    elif canonical(ctx.node.target) is F.interpolate:
        touched = range(2, x.ndim)
    else:
        touched = range(x.ndim - _SPATIAL[canonical(ctx.node.target)], x.ndim)
    dims = list(x.dims)
    for d in touched:
        if x.dims[d] is not None:
            ctx.space.block(x.dims[d], f"spatial op over a channel dim at {ctx.where}")
        dims[d] = None
    return TLabel(dims)


for _t in _SPATIAL:
    (RULES.module if isinstance(_t, type) else RULES.function)(_t)(spatial_rule)
RULES.function(F.pad)(spatial_rule)
