"""Channel rules for recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``).

A recurrent layer is one opaque call whose hidden size ties its gates, its recurrence and
its output together: the hidden size is not pruned (the output carries no channels and
every parameter past the first layer's input weights stays whole). Its *input features*
are an ordinary consumer dim: the first layer's ``weight_ih_l0`` (and, when bidirectional,
``weight_ih_l0_reverse``) columns multiply the input's last dim and nothing else, so the
producer feeding the layer can lose channels; the rewrite slices those columns and sets
``input_size`` (:func:`.rewrite._update_modules`).
"""
from __future__ import annotations

from torch import nn


from .layer_rules import _module_params
from .rule_table import RULES, RuleContext, as_tlabel, shape_of, unknown_rule, untracked_output


@RULES.module(nn.RNNBase)
def recurrent_module_rule(ctx: RuleContext):
    mod = ctx.module()
    x = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs["input"]
    label = as_tlabel(ctx.label(x), shape_of(x))
    if label is None:  # a PackedSequence, or no shape: nothing is known
        return unknown_rule(ctx)
    label = ctx.space.collapse(label)
    reason = (f"hidden state of {type(mod).__name__} `{ctx.node.target}` at node "
              f"`{ctx.node.name}` (a recurrent layer's hidden size is not pruned)")
    inputs = [n for n in ("weight_ih_l0", "weight_ih_l0_reverse") if hasattr(mod, n)]
    for p in _module_params(ctx, *inputs):
        ctx.space.union(label.dims[-1], p.dim(1), ctx.where)
        p.role(1, "consumer")
    for d in range(label.ndim - 1):  # time and batch positions are not channels
        ctx.space.block(label.dims[d], f"a recurrence runs along this dim at {ctx.where}")
    for a in list(ctx.node.args[1:]) + list(ctx.node.kwargs.values()):  # initial states
        ctx.space.block_label(ctx.label(a), reason)
    for name, p in mod.named_parameters():
        if name not in inputs:
            target = f"{ctx.node.target}.{name}"
            ctx.space.block_label(ctx.space.param_label(target, tuple(p.shape), p), reason)
    return untracked_output(ctx.node)



