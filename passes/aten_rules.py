"""Channel rules for ATen ops: the graphs of the ``torch.export`` front end.

Most ATen overloads take the arguments of a torch function or tensor method the rule
families already cover (``aten.view.default(x, sizes)`` is ``x.view(sizes)``,
``aten.layer_norm.default`` is ``F.layer_norm``): they are registered as *aliases* of
those in the one rule table (:meth:`.rule_table.RuleTable.alias`), so they share the
rule, the rewrite's literal patching and verification's masked norms. The few whose
arguments differ get adapters here that call the families' cores: batch norm (ATen puts
the affine before the running statistics), ``_native_batch_norm_legit_no_training``,
``convolution``, ``addmm`` / ``mm`` over a transposed weight (``linear`` after
decomposition), ``embedding`` (weight first), ``slice``, ``select`` and ``index`` (indexing).
ATen ops with neither fail closed through :func:`.rule_table.unknown_rule`, named.

Contract: importing this module registers rules; nothing else. Invariant: an alias is
only declared where the ATen schema's positional arguments mean what the torch-level
call's do (checked against ``torch.ops.aten.<op>.<overload>._schema``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .index_rules import _pick, _slice, index_tensor
from .labels import TLabel
from .layer_rules import (_SPATIAL, Param, _couple_affine, _input, conv_core, linear_core,
                          spatial_rule)
from .rule_table import RULES, RuleContext, as_tlabel, shape_of, unknown_rule, untracked_output
from .tensor_rules import metadata_rule
from .weight_rules import is_2d_transpose

__all__ = ["ATEN_LIKE_METHOD", "ATEN_LIKE_FUNCTION", "ATEN_AS_FUNCTION", "NOT_AS_METHOD"]

aten = torch.ops.aten

# ATen packets whose every overload takes the positional arguments of the tensor method
# of the same name (``aten.add.Tensor(x, y, alpha)`` = ``x.add(y, alpha)``).
ATEN_LIKE_METHOD = [
    # passthrough
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt",
    "abs", "neg", "clamp", "clamp_", "clamp_min", "clamp_max", "contiguous", "clone", "detach",
    "square", "erf", "gelu", "gelu_", "hardswish", "hardswish_", "sign", "nan_to_num",
    "exp_", "neg_", "sqrt_", "abs_", "sin", "cos", "atan", "erfc", "sinc", "log1p", "expm1",
    "reciprocal", "floor", "round", "frac", "trunc", "logit",
    # elementwise
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
    "masked_fill", "masked_fill_", "where", "lerp", "addcmul",
    # reductions, normalising ops
    "mean", "sum", "amax", "amin", "var", "std", "logsumexp", "prod", "softmax",
    "log_softmax", "cumsum",
    # shape ops
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose",
    "t", "swapaxes", "movedim", "expand", "repeat", "roll", "flip", "view_as", "reshape_as",
    "expand_as",
    "split", "chunk", "tensor_split", "unbind", "split_with_sizes",
    # products, metadata
    "matmul", "bmm", "mm", "zero_", "fill_", "bernoulli", "bernoulli_",
]
# ATen overloads (by packet and overload name) that take a torch function's arguments,
# or another method's.
ATEN_LIKE_FUNCTION = {
    "linear.default": F.linear, "conv1d.default": F.conv1d, "conv2d.default": F.conv2d,
    "conv3d.default": F.conv3d, "conv1d.padding": F.conv1d, "conv2d.padding": F.conv2d,
    "conv3d.padding": F.conv3d, "conv_transpose1d.default": F.conv_transpose1d,
    "conv_transpose2d.input": F.conv_transpose2d, "conv_transpose3d.input": F.conv_transpose3d,
    "layer_norm.default": F.layer_norm, "group_norm.default": F.group_norm,
    "scaled_dot_product_attention.default": F.scaled_dot_product_attention,
    "cat.default": torch.cat, "concat.default": torch.cat, "stack.default": torch.stack,
    "dropout.default": F.dropout, "silu.default": F.silu, "silu_.default": F.silu,
    "mish.default": F.mish, "mish_.default": F.mish, "hardsigmoid.default": F.hardsigmoid,
    "hardsigmoid_.default": F.hardsigmoid, "hardtanh.default": F.hardtanh,
    "hardtanh_.default": F.hardtanh, "leaky_relu.default": F.leaky_relu,
    "leaky_relu_.default": F.leaky_relu, "elu.default": F.elu, "softplus.default": F.softplus,
    "log_sigmoid.default": F.logsigmoid, "softshrink.default": F.softshrink,
    "hardshrink.default": F.hardshrink, "rrelu.default": F.rrelu,
    "threshold.default": F.threshold, "special_expit.default": torch.special.expit,
    "_softmax.default": F.softmax, "_log_softmax.default": F.log_softmax,
    "max.other": torch.maximum, "min.other": torch.minimum,
    "max_pool1d.default": F.max_pool1d, "max_pool2d.default": F.max_pool2d,
    "max_pool3d.default": F.max_pool3d, "avg_pool1d.default": F.avg_pool1d,
    "avg_pool2d.default": F.avg_pool2d, "avg_pool3d.default": F.avg_pool3d,
    "adaptive_avg_pool1d.default": F.adaptive_avg_pool1d,
    "adaptive_avg_pool2d.default": F.adaptive_avg_pool2d,
    "_adaptive_avg_pool2d.default": F.adaptive_avg_pool2d,
    "adaptive_avg_pool3d.default": F.adaptive_avg_pool3d,
    "upsample_nearest2d.vec": F.interpolate, "upsample_bilinear2d.vec": F.interpolate,
    "upsample_bicubic2d.vec": F.interpolate, "pad.default": F.pad,
    "constant_pad_nd.default": F.pad,
    "_unsafe_view.default": "view", "sym_size.int": "size", "alias.default": "clone",
    "_to_copy.default": "to", "to.dtype": "to", "to.dtype_layout": "to", "to.device": "to",
    "lift_fresh_copy.default": "clone", "max.dim": "max", "min.dim": "min",
    "max.default": "max", "min.default": "min", "broadcast_to.default": "expand",
}


# ATen overloads that run as a torch function with their first ``n`` positional
# arguments (the rest are ATen-only flags left at torch's defaults: ``cudnn_enable``) and
# ``extra`` keywords (in-place activations: ``inplace=True``). The lowering pass
# (:mod:`.aten_lowering`) rewrites them so every pass that recognises torch-level layers
# (scoring's OBA curvature, math attention) sees them as on the FX front end.
ATEN_AS_FUNCTION = {
    "linear.default": (F.linear, 3, {}), "conv1d.default": (F.conv1d, 7, {}),
    "conv2d.default": (F.conv2d, 7, {}), "conv3d.default": (F.conv3d, 7, {}),
    "conv_transpose1d.default": (F.conv_transpose1d, 8, {}),
    "conv_transpose2d.input": (F.conv_transpose2d, 8, {}),
    "conv_transpose3d.input": (F.conv_transpose3d, 8, {}),
    "layer_norm.default": (F.layer_norm, 5, {}), "group_norm.default": (F.group_norm, 5, {}),
    "scaled_dot_product_attention.default": (F.scaled_dot_product_attention, 8, {}),
    "einsum.default": (torch.einsum, 2, {}), "cat.default": (torch.cat, 2, {}),
    "stack.default": (torch.stack, 2, {}), "dropout.default": (F.dropout, 3, {}),
    "max.other": (torch.maximum, 2, {}), "min.other": (torch.minimum, 2, {}),
    "silu.default": (F.silu, 1, {}), "silu_.default": (F.silu, 1, {"inplace": True}),
    "mish.default": (F.mish, 1, {}), "mish_.default": (F.mish, 1, {"inplace": True}),
    "hardsigmoid.default": (F.hardsigmoid, 1, {}),
    "hardsigmoid_.default": (F.hardsigmoid, 1, {"inplace": True}),
    "hardswish_.default": (F.hardswish, 1, {"inplace": True}),
    "hardtanh.default": (F.hardtanh, 3, {}), "hardtanh_.default": (F.hardtanh, 3, {"inplace": True}),
    "leaky_relu.default": (F.leaky_relu, 2, {}),
    "leaky_relu_.default": (F.leaky_relu, 2, {"inplace": True}),
    "max_pool1d.default": (F.max_pool1d, 6, {}), "max_pool2d.default": (F.max_pool2d, 6, {}),
    "max_pool3d.default": (F.max_pool3d, 6, {}), "avg_pool2d.default": (F.avg_pool2d, 7, {}),
    "adaptive_avg_pool1d.default": (F.adaptive_avg_pool1d, 2, {}),
    "adaptive_avg_pool2d.default": (F.adaptive_avg_pool2d, 2, {}),
}
# ATEN_LIKE_METHOD packets that do not run as the method of their first argument
# (``x.where(c, y)`` is ``where(c, x, y)``, not ``aten.where(x, c, y)``).
NOT_AS_METHOD = {"where"}


def _overload(spec: str):
    packet, _, name = spec.partition(".")
    return getattr(getattr(aten, packet, None), name, None)


def _register_aliases() -> None:
    for packet_name in ATEN_LIKE_METHOD:
        packet = getattr(aten, packet_name, None)
        if packet is None:
            continue
        # an in-place variant takes its op's arguments (``relu_`` = ``relu``)
        like = packet_name if packet_name in RULES.methods else packet_name.rstrip("_")
        for name in packet.overloads():
            if (packet_name, name) not in _NOT_METHOD_LIKE:
                RULES.alias(like, getattr(packet, name))
    for spec, like in ATEN_LIKE_FUNCTION.items():
        op = _overload(spec)
        if op is not None:
            RULES.alias(like, op)


# overloads of ATEN_LIKE_METHOD packets that do not take the method's arguments
_NOT_METHOD_LIKE = {("softmax", "Dimname"), ("log_softmax", "Dimname")}
_register_aliases()
RULES.by_name("torch.export._unlift.GuardsFn")(metadata_rule)  # input checks of ep.module()
# run-time checks export inserts (``.to(dtype)`` asserts its input's metadata): no output
RULES.function(*[op for op in (getattr(getattr(aten, n, None), "default", None) for n in (
    "_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
    "sym_constrain_range_for_size")) if op is not None])(metadata_rule)
_SPATIAL.update({aten.max_pool2d_with_indices.default: 2})


@RULES.function(aten.max_pool2d_with_indices.default)
def aten_pool_with_indices_rule(ctx: RuleContext):
    """(pooled, indices): the pooled output as any spatial op; the indices carry nothing."""
    return [spatial_rule(ctx), untracked_output(ctx.node)[1]]


# --------------------------------------------------------------------------- norms
@RULES.function(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                aten.instance_norm.default)
def aten_batch_norm_rule(ctx: RuleContext):
    """ATen's batch / instance norm: ``(input, weight, bias, running_mean, running_var,
    ...)``. Batch norm with batch statistics (``training=True``) is blocked (weight
    standardisation is followed on the FX front end only); instance norm's statistics
    are per channel either way."""
    x = _input(ctx)
    legit = ctx.node.target is aten._native_batch_norm_legit_no_training.default
    training = ctx.node.target is aten.batch_norm.default and bool(ctx.arg(5, "training"))
    params = [Param(ctx, ctx.arg(i, n)) for i, n in
              enumerate(("weight", "bias", "running_mean", "running_var"), start=1)]
    if training:
        ctx.space.block_label(x, f"batch norm with batch statistics at {ctx.where}")
        for p in params:
            ctx.space.block_label(p.label, f"batch norm with batch statistics at {ctx.where}")
    else:
        _couple_affine(ctx, x.dims[1], params)
    if legit:  # (output, save_mean, save_invstd)
        return [x] + untracked_output(ctx.node)[1:]
    return x


# --------------------------------------------------------------------------- layers
@RULES.function(aten.convolution.default)
def aten_convolution_rule(ctx: RuleContext):
    """``convolution(input, weight, bias, stride, padding, dilation, transposed,
    output_padding, groups)`` (decomposed graphs). Grouped: blocked, because the rewrite
    patches the ``groups`` argument of the conv functions only."""
    w, b = Param(ctx, ctx.arg(1, "weight")), Param(ctx, ctx.arg(2, "bias"))
    transposed, groups = bool(ctx.arg(6, "transposed")), int(ctx.arg(8, "groups"))
    out = conv_core(ctx, _input(ctx), w, b, 1 if groups == 1 else groups, transposed)
    if groups != 1:
        ctx.space.block(w.dim(1 if transposed else 0), f"grouped `convolution` at {ctx.where}")
    return out


def _transposed_param(value):
    """The get_attr node ``w`` when ``value`` is a 2-D transpose of it (``w.t()``,
    ``w.T``, ``w.permute(1, 0)``, as ATen overloads or lowered methods), else None."""
    if not isinstance(value, torch.fx.Node) or not is_2d_transpose(value):
        return None
    src = value.args[0]
    return src if isinstance(src, torch.fx.Node) and src.op == "get_attr" else None


@RULES.function(aten.numpy_T.default, aten.mT.default)
def aten_transpose_attr_rule(ctx: RuleContext):
    """``numpy_T(x)`` = ``x.T`` (every dim reversed) and ``mT(x)`` = ``x.mT`` (the last
    two swapped): what the ``.T`` / ``.mT`` attributes become in captured graphs."""
    x = ctx.arg(0, "self")
    label = as_tlabel(ctx.label(x), shape_of(x))
    if label is None:
        return untracked_output(ctx.node)
    nd = label.ndim
    perm = (list(range(nd))[::-1] if ctx.node.target is aten.numpy_T.default
            else list(range(nd - 2)) + [nd - 1, nd - 2])
    return label.permute(perm)


@RULES.function(aten.addmm.default, torch.addmm)
def aten_addmm_rule(ctx: RuleContext):
    """``addmm(bias, x, w.t())``: a linear layer (decomposed graphs, or ``torch.addmm``
    written by hand); ``addmm(bias, x, w)`` with ``w`` a ``[in, out]`` parameter: the
    same layer stored transposed (Hugging Face's ``Conv1D``, GPT-2's layers); other
    operands are a matmul plus a broadcast add."""
    bias = ctx.arg(0, "self") if ctx.node.target is aten.addmm.default else ctx.arg(0, "input")
    x, w_t = ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    w, out_dim = _transposed_param(w_t), 0
    if w is None and isinstance(w_t, torch.fx.Node) and w_t.op == "get_attr":
        w, out_dim = w_t, 1
    if w is None or ctx.arg(3, "beta", 1) != 1 or ctx.arg(4, "alpha", 1) != 1:
        return unknown_rule(ctx)
    x_label = ctx.space.collapse(as_tlabel(ctx.label(x), shape_of(x)))
    b = Param(ctx, bias) if shape_of(bias) is not None and len(shape_of(bias)) == 1 else None
    if b is None:
        return unknown_rule(ctx)
    return linear_core(ctx, x_label, Param(ctx, w), b, out_dim)


@RULES.function(aten.embedding.default)
def aten_embedding_rule(ctx: RuleContext):
    """``embedding(weight, indices, ...)``: the weight's columns are the output's features."""
    w = Param(ctx, ctx.arg(0, "weight"))
    ids = ctx.arg(1, "indices")
    w.role(1, "producer")
    return TLabel(list(as_tlabel(ctx.label(ids), shape_of(ids)).dims) + [w.dim(1)])


# --------------------------------------------------------------------------- indexing
@RULES.function(aten.slice.Tensor)
def aten_slice_rule(ctx: RuleContext):
    """``slice(x, dim, start, end, step)`` = ``x[..., start:end:step]`` along ``dim``."""
    x = ctx.arg(0, "self")
    label, shape = as_tlabel(ctx.label(x), shape_of(x)), shape_of(x)
    dim = ctx.arg(1, "dim", 0) % len(shape)
    item = slice(ctx.arg(2, "start"), ctx.arg(3, "end"), ctx.arg(4, "step", 1))
    return _slice(ctx, label, dim, item, shape[dim], ctx.out_shape[dim])


@RULES.function(aten.select.int)
def aten_select_rule(ctx: RuleContext):
    """``select(x, dim, index)`` = ``x[..., index]`` along ``dim``."""
    x = ctx.arg(0, "self")
    label, shape = as_tlabel(ctx.label(x), shape_of(x)), shape_of(x)
    return _pick(ctx, label, ctx.arg(1, "dim") % len(shape), ctx.arg(2, "index"))




@RULES.function(aten.index.Tensor)
def aten_index_rule(ctx: RuleContext):
    """``index(x, [i0, None, i2])`` = ``x[i0, :, i2]`` (advanced indexing: a gather)."""
    x = ctx.arg(0, "self")
    items = tuple(slice(None) if i is None else i for i in ctx.arg(1, "indices"))
    return index_tensor(ctx, as_tlabel(ctx.label(x), shape_of(x)), shape_of(x), items)
