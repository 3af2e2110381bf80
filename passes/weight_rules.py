"""Weight operands of parameter layers: :class:`Param` (a parameter's label and the
name its roles are recorded under) and :func:`weight_param`, which follows a conv/linear
weight computed from a parameter back to that parameter (reshapes, a transpose of a
2-D weight, weight standardisation) or blocks the parameter's rows with the reason.

Contract: reads the labels of the weight operand's nodes (``node.meta["tensor_meta"]``
for the transposes); writes roles and blocks into the :class:`ChannelSpace`; the
parameter's own ids are what the layer rule couples, so every use of a tensor couples.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .rule_table import RuleContext, as_tlabel, shape_of

__all__ = ["Param", "weight_param", "is_2d_transpose"]


class Param:
    """A parameter operand: its label and, when it is a named tensor, its target."""

    def __init__(self, ctx: RuleContext, value, target: Optional[str] = None, shape=None,
                 tensor=None):
        self.ctx = ctx
        self.perm: Optional[tuple] = None  # operand dim d is the target's dim perm[d]
        if target is None and isinstance(value, torch.fx.Node) and value.op == "get_attr":
            target = value.target
        self.target = target
        if target is not None and shape is not None:
            self.label = ctx.space.param_label(target, shape, tensor)
        elif value is not None:
            self.label = as_tlabel(ctx.label(value), shape_of(value))
        else:
            self.label = None

    def dim(self, d: int):
        return None if self.label is None else self.label.dims[d]

    def role(self, d: int, role: str) -> None:
        if self.target is not None and self.label is not None:
            d %= self.label.ndim
            self.ctx.space.set_role(self.target, self.perm[d] if self.perm else d, role)


# --------------------------------------------------------------------------- computed weights
# Ops that may compute a conv/linear weight from a parameter while keeping its rows and
# columns those of the parameter: reshapes, and batch norm with batch statistics over a
# [1, out, fan_in] view (timm's StdConv2d / ScaledStdConv2d weight standardisation: each
# output row is standardised over its own fan-in; the verifier computes those statistics
# over the kept columns, verify._norm_args).
_WEIGHT_VIEWS = {"reshape", "view", "reshape_as", "view_as", "contiguous"}
# ...and the transposes of a 2-D weight (``F.linear(x, self.w.t())``: ``w``'s columns
# are the layer's output rows), which swap its rows and columns.
_TRANSPOSES = {"t", "T", "mT"}


def _weight_step(node: torch.fx.Node):
    """``(the node a weight-computing op reads its weight from, whether the op swaps
    the rows and columns of a 2-D weight)``, or ``(None, False)`` for other ops."""
    if node.op == "call_method" and node.target in _WEIGHT_VIEWS:
        return node.args[0], False
    if is_2d_transpose(node):
        return node.args[0], True
    if node.op == "call_function" and node.target is F.batch_norm:
        get = lambda i, n: node.args[i] if len(node.args) > i else node.kwargs.get(n)
        if get(1, "running_mean") is None and get(2, "running_var") is None \
                and get(5, "training") is True:
            return node.args[0], False
    return None, False


#: ATen overloads of a 2-D transpose (captured graphs keep these as functions, or lower
#: them to the method of the same name) -> the method spelling each matches.
_ATEN_TRANSPOSES = {torch.ops.aten.t.default: "t", torch.ops.aten.numpy_T.default: "T",
                    torch.ops.aten.mT.default: "T", torch.ops.aten.permute.default: "permute",
                    torch.ops.aten.transpose.int: "transpose"}


def is_2d_transpose(node: torch.fx.Node) -> bool:
    """``w.t()`` / ``torch.t(w)``, ``w.T`` / ``w.mT``, ``w.transpose(0, 1)`` /
    ``torch.transpose(w, 0, 1)`` or ``w.permute(1, 0)`` / ``torch.permute(w, (1, 0))``
    of a 2-D tensor, as torch calls, methods or their ATen overloads (the one predicate
    for "a transposed weight": the weight rules and ATen's ``addmm`` rule read it)."""
    meta = node.meta.get("tensor_meta")
    if getattr(meta, "shape", None) is None or len(meta.shape) != 2:
        return False
    if node.op not in ("call_method", "call_function"):
        return False
    if node.op == "call_function" and node.target in _ATEN_TRANSPOSES:
        name = _ATEN_TRANSPOSES[node.target]
        if name == "T":
            return True
        return _names_a_2d_swap(name, list(node.args[1:]))
    if node.op == "call_function" and node.target not in (torch.t, torch.transpose,
                                                          torch.permute, getattr):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    args = list(node.args[1:])
    if name == "getattr":
        return bool(args) and args[0] in _TRANSPOSES
    return _names_a_2d_swap(name, args)


def _names_a_2d_swap(name: str, args: list) -> bool:
    """Whether method ``name`` with arguments ``args`` (after the tensor) swaps the two
    dims of a 2-D tensor."""
    if name == "permute" and len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    dims = [a % 2 for a in args if isinstance(a, int)] if len(args) == 2 else []
    return name == "t" or (name == "transpose" and sorted(dims) == [0, 1]) or (
        name == "permute" and dims == [1, 0])


def weight_param(ctx: RuleContext, value) -> Param:
    """A conv/linear weight operand: the parameter itself when it is one, or when it is
    computed from one through :data:`_WEIGHT_VIEWS`, a transpose of a 2-D weight or
    weight standardisation with rows and columns unchanged (or swapped, by a transpose).
    A weight computed from a parameter by any other op blocks that parameter's rows,
    which still form a group, with the reason."""
    w = Param(ctx, value)
    if w.target is not None or not isinstance(value, torch.fx.Node) or w.label is None:
        return w
    node, swapped = value, False
    while node is not None and node.op != "get_attr":
        node, swap = _weight_step(node)
        swapped ^= swap
    if node is not None:
        src = Param(ctx, node)
        perm = (1, 0) if swapped else (0, 1)
        if src.label is not None and src.label.ndim == w.label.ndim and all(
                _same(src.dim(perm[d]), w.dim(d)) for d in (0, 1)):
            if swapped:  # the operand's labels, the parameter's dims for the roles
                src.label, src.perm = w.label, perm
            return src
    rec = _record_of(ctx, w.dim(0))
    if rec is not None and rec.dim == 0 and rec.role == "tensor":  # (not a transposed tie)
        ctx.space.set_role(rec.target, rec.dim, "producer")
        ctx.space.block(rec.ids, f"the weight of {ctx.where} is computed from `{rec.target}` "
                        "by ops without a weight rule (only reshapes and weight "
                        "standardisation are followed)")
    return w


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _record_of(ctx: RuleContext, ids):
    """The parameter dim whose ids are exactly ``ids``, if any."""
    if ids is None:
        return None
    return next((r for r in ctx.space.records.values()
                 if r.ids.size == ids.size and np.array_equal(r.ids, ids)), None)
