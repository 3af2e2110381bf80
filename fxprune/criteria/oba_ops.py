"""What OBA knows about ops, shared by its graph analysis (:mod:`.oba_graph`) and its
tangent rules (:mod:`.oba_tangents`).

* the op families: parameter layers (Conv/Linear modules, functional ``linear``/``conv*``)
  and multiplicative ops (matmul-like, elementwise ``mul``), by function and by method;
* how to run a node *out of place* (:class:`Exec`, :func:`resolve`): in-place ops
  (``relu_``, ``x += y``, ``inplace=True`` modules/functions) run as their functional
  variants and the result is re-bound to the mutated value; the user's graph and modules
  are never modified;
* reading the values of the OBA pass: :func:`detach_tree`, :func:`tangent`.

Imports nothing of OBA's own, so both modules that use it stay free of import cycles.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg
from torch.utils._pytree import tree_map

__all__ = ["LAYER_MODULES", "LAYER_FUNCTIONS", "MATMUL_FUNCTIONS", "MUL_FUNCTIONS",
           "MATMUL_METHODS", "MUL_METHODS", "Exec", "resolve", "detach_tree", "tangent"]

LAYER_MODULES = (nn.Linear, nn.modules.conv._ConvNd)
LAYER_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
                   F.conv_transpose2d, F.conv_transpose3d}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.einsum}
MUL_FUNCTIONS = {operator.mul, torch.mul}
MATMUL_METHODS = {"matmul", "bmm", "mm"}
MUL_METHODS = {"mul"}
_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv,
                      operator.ifloordiv: operator.floordiv, operator.imatmul: operator.matmul,
                      operator.ipow: operator.pow, operator.imod: operator.mod}


@dataclass
class Exec:
    """How to run one node out of place: ``fn(*args, **kwargs)`` with node arguments
    looked up in an environment; ``rebind`` is the node an in-place op mutated."""

    fn: Callable
    nargs: list
    kwargs: dict
    rebind: Optional[Node] = None

    def args(self, env: Dict) -> tuple:
        """(positional list, keyword dict) with every node replaced by ``env[node]``."""
        look = env.__getitem__
        return ([map_arg(a, look) for a in self.nargs],
                {k: map_arg(v, look) for k, v in self.kwargs.items()})


def _method(name: str) -> Callable:
    """A function calling the tensor method ``name`` on its first argument."""
    def call(self, *args, **kwargs):
        return getattr(self, name)(*args, **kwargs)
    call.__name__ = name
    return call


def resolve(gm: GraphModule, node: Node) -> Exec:
    """The out-of-place :class:`Exec` of a call node: in-place variants become their
    functional ones with ``rebind`` set to the mutated node; einsum operands and the
    input/weight/bias of a functional layer are put in positional slots."""
    args, kwargs = list(node.args), dict(node.kwargs)
    mutated = args[0] if args and isinstance(args[0], Node) else None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if getattr(mod, "inplace", False) is True:
            mod = copy.copy(mod)
            mod.inplace = False
            return Exec(mod, args, kwargs, mutated)
        return Exec(mod, args, kwargs)
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_") and hasattr(Tensor, name[:-1]):
            return Exec(_method(name[:-1]), args, kwargs, mutated)
        return Exec(_method(name), args, kwargs)
    fn = node.target
    if fn in _INPLACE_OPERATORS:
        return Exec(_INPLACE_OPERATORS[fn], args, kwargs, mutated)
    if kwargs.get("inplace") is True:
        kwargs["inplace"] = False
        return Exec(fn, args, kwargs, mutated)
    name = getattr(fn, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        pure = getattr(torch, name[:-1], None) or getattr(F, name[:-1], None)
        if callable(pure):
            return Exec(pure, args, kwargs, mutated)
    if fn is torch.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
        args = [args[0], *args[1]]
    if fn in LAYER_FUNCTIONS:                       # input, weight, bias -> slots 0, 1, 2
        for slot, key in enumerate(("input", "weight", "bias")):
            if key in kwargs:
                args += [None] * (slot + 1 - len(args))
                args[slot] = kwargs.pop(key)
    return Exec(fn, args, kwargs)


def detach_tree(value):
    """``value`` with every tensor in it (tuples, lists, dicts) detached."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, value)


def tangent(value) -> Optional[Tensor]:
    """The forward-AD tangent of ``value`` (None for non-tensors and zero tangents)."""
    return fwAD.unpack_dual(value).tangent if isinstance(value, Tensor) else None
