"""Cheap tangent rules for the OBA forward pass.

Forward-mode AD always recomputes the primal next to the tangent. In the OBA pass the
primal is already there (the live autograd value), so for the ops that dominate CNNs and
transformers the tangent is computed directly from the live primal:

* ops linear in their first argument (reshape family, getitem, pooling by averaging,
  mean/sum, Identity/Dropout/Flatten in eval): ``T = op(T_x, *rest)``;
* ``add``/``sub``: ``T = T_a ± T_b``; ``cat``: concatenated tangents;
* multiplicative ops (mul, div by a constant, matmul, bmm, einsum):
  ``T = op(T_u, v) + op(u, T_v)`` (the product rule);
* ReLU: ``T = T_x · [y > 0]``; eval-mode BatchNorm: ``T = T_x · γ / sqrt(var + ε)``;
  GELU: ``T = gelu'(x) T_x``; softmax: ``T = y ⊙ (T_x - Σ y ⊙ T_x)``; LayerNorm:
  ``T = γ ⊙ (T_x - mean T_x - x̂ ⊙ mean(x̂ ⊙ T_x)) / σ`` (γ, β held constant).

A rule returns :data:`FALLBACK` when its preconditions fail at run time (for instance a
tangent on an argument it assumes constant); the node then runs under forward AD, which
is also what every op without a rule does. Rules run under ``torch.no_grad()``.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node
from torch.utils._pytree import tree_flatten

from .oba_ops import (MATMUL_FUNCTIONS, MATMUL_METHODS, MUL_FUNCTIONS, MUL_METHODS, Exec,
                      tangent)
from .oba_ops import detach_tree as _detach

FALLBACK = object()

_LINEAR_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "contiguous",
                   "expand", "unsqueeze", "squeeze", "mean", "sum", "t", "unflatten",
                   "narrow", "select", "repeat", "flip", "chunk", "split", "unbind",
                   "view_as", "reshape_as", "expand_as", "neg"}
_LINEAR_FUNCTIONS = {operator.getitem, operator.neg, torch.neg, torch.flatten,
                     torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                     torch.unsqueeze, torch.mean, torch.sum, torch.chunk, torch.split,
                     torch.unbind, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
_LINEAR_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
                   nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.AvgPool1d, nn.AvgPool2d,
                   nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.AdaptiveAvgPool3d)
_RELU = {F.relu, torch.relu}


def _has_tangent(values) -> bool:
    """True when any tensor in ``values`` carries a forward-AD tangent."""
    return any(tangent(leaf) is not None for leaf in tree_flatten(values)[0])


def _linear_first(fn: Callable) -> Callable:
    """Rule of an op linear in its first argument: ``T = fn(T_x, *rest)``."""
    def rule(value, largs, lkw, dargs, dkw):
        if not isinstance(dargs[0], Tensor) or _has_tangent((dargs[1:], dkw)):
            return FALLBACK
        t = tangent(dargs[0])
        return None if t is None else fn(t, *_detach(largs[1:]), **_detach(lkw))
    return rule


def _add(sign: int) -> Callable:
    """Rule of ``a + b`` (sign 1) or ``a - b`` (sign -1)."""
    def rule(value, largs, lkw, dargs, dkw):
        if len(dargs) != 2 or dkw or not isinstance(value, Tensor):
            return FALLBACK
        ta, tb = tangent(dargs[0]), tangent(dargs[1])
        if tb is not None and sign < 0:
            tb = -tb
        t = tb if ta is None else ta if tb is None else ta + tb
        if t is not None and t.shape != value.shape:
            t = t.expand(value.shape).contiguous()
        return t
    return rule


def _product(fn: Callable, slots) -> Callable:
    """Product rule of a multiplicative op whose operands sit in ``slots``."""
    def rule(value, largs, lkw, dargs, dkw):
        others = [a for i, a in enumerate(dargs) if i not in slots]
        if not isinstance(value, Tensor) or _has_tangent((others, dkw)):
            return FALLBACK
        args = _detach(largs)
        t = None
        for i, j in (slots, slots[::-1]):
            ti = tangent(dargs[i])
            if ti is not None:
                full = list(args)
                full[i] = ti
                term = fn(*full, **_detach(lkw))
                t = term if t is None else t + term
        if t is not None and t.shape != value.shape:
            t = t.expand(value.shape).contiguous()
        return t
    return rule


def _divide(value, largs, lkw, dargs, dkw):
    """Rule of ``x / c`` with a constant divisor."""
    if len(dargs) != 2 or dkw or _has_tangent(dargs[1]):
        return FALLBACK
    t = tangent(dargs[0])
    return None if t is None else t / _detach(largs[1])


def _relu(value, largs, lkw, dargs, dkw):
    """Rule of ReLU: the tangent where the output is positive."""
    if _has_tangent((dargs[1:], dkw)) or not isinstance(dargs[0], Tensor):
        return FALLBACK
    t = tangent(dargs[0])
    return None if t is None else torch.ops.aten.threshold_backward(t, value.detach(), 0)


def _batch_norm(mod: nn.modules.batchnorm._BatchNorm) -> Callable:
    """Rule of an eval-mode BatchNorm module: a per-channel scale."""
    def rule(value, largs, lkw, dargs, dkw):
        if mod.training or mod.running_var is None or len(dargs) != 1:
            return FALLBACK
        t = tangent(dargs[0])
        if t is None:
            return None
        scale = torch.rsqrt(mod.running_var + mod.eps)
        if mod.weight is not None:
            scale = scale * mod.weight.detach()
        return t * scale.to(t.dtype).view([1, -1] + [1] * (t.dim() - 2))
    return rule


def _gelu(approximate: Optional[str]) -> Callable:
    """Rule of GELU: ``gelu'(x) T_x`` (one ``gelu_backward`` call)."""
    def rule(value, largs, lkw, dargs, dkw):
        if len(dargs) != 1 or _has_tangent(dkw) or not isinstance(dargs[0], Tensor):
            return FALLBACK
        t = tangent(dargs[0])
        approx = lkw.get("approximate", approximate or "none")
        return None if t is None else torch.ops.aten.gelu_backward(
            t, largs[0].detach(), approximate=approx)
    return rule


def _softmax(value, largs, lkw, dargs, dkw):
    """Rule of softmax along ``dim``: ``y ⊙ (T - Σ y ⊙ T)``."""
    dim = largs[1] if len(largs) > 1 else lkw.get("dim")
    if (dim is None or _has_tangent((dargs[1:], dkw)) or not isinstance(dargs[0], Tensor)
            or lkw.get("dtype") is not None or len(largs) > 2):
        return FALLBACK
    t = tangent(dargs[0])
    if t is None:
        return None
    y = value.detach()
    return y * (t - (y * t).sum(dim, keepdim=True))


def _layer_norm(shape, weight, eps, value, x, dx, dextra):
    """LayerNorm tangent with constant affine parameters (see the module docstring)."""
    if not isinstance(dx, Tensor) or _has_tangent(dextra):
        return FALLBACK
    t = tangent(dx)
    if t is None:
        return None
    dims = tuple(range(-len(shape), 0))
    xhat, _, rstd = torch.native_layer_norm(x.detach(), list(shape), None, None, eps)
    t = t - t.mean(dims, keepdim=True) - xhat * (xhat * t).mean(dims, keepdim=True)
    t = t * rstd
    return t * weight.detach() if weight is not None else t


def _layer_norm_module(mod: nn.LayerNorm) -> Callable:
    """Rule of an ``nn.LayerNorm`` module."""
    def rule(value, largs, lkw, dargs, dkw):
        if len(dargs) != 1:
            return FALLBACK
        return _layer_norm(mod.normalized_shape, mod.weight, mod.eps, value, largs[0],
                           dargs[0], dkw)
    return rule


def _layer_norm_function(value, largs, lkw, dargs, dkw):
    """Rule of ``F.layer_norm`` (positional or keyword arguments)."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    a = dict(zip(names, largs), **lkw)
    d = dict(zip(names, dargs), **dkw)
    shape = a.get("normalized_shape")
    shape = (shape,) if isinstance(shape, int) else shape
    return _layer_norm(shape, a.get("weight"), a.get("eps", 1e-5), value, a["input"],
                       d["input"], (d.get("weight"), d.get("bias")))


def _cat(value, largs, lkw, dargs, dkw):
    """Rule of ``torch.cat``: concatenated tangents, zeros where an input has none."""
    if not isinstance(dargs[0], (list, tuple)) or _has_tangent((dargs[1:], dkw)):
        return FALLBACK
    ts = [tangent(d) for d in dargs[0]]
    if all(t is None for t in ts):
        return None
    parts = [t if t is not None else torch.zeros_like(x)
             for t, x in zip(ts, _detach(largs[0]))]
    return torch.cat(parts, *largs[1:], **lkw)


def tangent_rule(gm, node: Node, ex: Exec, slots) -> Optional[Callable]:
    """The rule ``(value, largs, lkw, dargs, dkw) -> tangent | None | FALLBACK`` for
    ``node`` (None when the node has no rule and always runs under forward AD).
    ``slots`` are the operand slots of a multiplicative node, if it is one."""
    fn = ex.fn
    if node.op == "call_module":
        if isinstance(fn, _LINEAR_MODULES):
            return _linear_first(fn)
        if isinstance(fn, nn.ReLU):
            return _relu
        if isinstance(fn, nn.modules.batchnorm._BatchNorm):
            return _batch_norm(fn)
        if isinstance(fn, nn.GELU):
            return _gelu(fn.approximate)
        if isinstance(fn, nn.Softmax) and fn.dim is not None:
            return lambda value, largs, lkw, dargs, dkw: _softmax(
                value, [largs[0], fn.dim], {}, dargs, dkw)
        if isinstance(fn, nn.LayerNorm):
            return _layer_norm_module(fn)
        return None
    name = fn.__name__ if node.op == "call_method" else None
    if slots is not None and (fn in MATMUL_FUNCTIONS | MUL_FUNCTIONS
                              or name in MATMUL_METHODS | MUL_METHODS):
        return _product(fn, tuple(slots))
    if name in _LINEAR_METHODS or (name is None and fn in _LINEAR_FUNCTIONS):
        return _linear_first(fn)
    if name == "relu" or fn in _RELU:
        return _relu
    if fn in (operator.add, torch.add) or name == "add":
        return _add(+1)
    if fn in (operator.sub, torch.sub) or name == "sub":
        return _add(-1)
    if fn in (operator.truediv, torch.div) or name == "div":
        return _divide
    if fn is torch.cat:
        return _cat
    if fn is F.gelu or name == "gelu":
        return _gelu(None)
    if fn in (torch.softmax, F.softmax) or name == "softmax":
        return _softmax
    if fn is F.layer_norm:
        return _layer_norm_function
    return None
