"""Lowering pass: the ATen ops of an exported graph that have torch-level twins become
those torch calls (``aten.linear.default`` -> ``F.linear``, ``aten.view.default`` ->
``x.view(...)``, ``aten.relu_.default`` -> ``x.relu_()``).

Why: passes beyond the channel rules recognise layers by their torch-level targets
(scoring's OBA finds ``F.linear``/``F.conv2d``/``matmul`` layers and runs in-place ops out
of place by their trailing ``_``; the math-attention swap looks for
``F.scaled_dot_product_attention``). After lowering, an exported graph reads like a
symbolically traced one wherever the two op sets agree, and those passes need no ATen
knowledge. What is lowered is the table in :mod:`.aten_rules` (``ATEN_AS_FUNCTION``, and
the method-like packets ``ATEN_LIKE_METHOD`` whose first argument is a tensor); the rest
stays ATen and is handled by the ATen rules.

Contract: reads and rewrites ``gm.graph`` in place (targets, ops and arguments of call
nodes; nothing else), then recompiles. Invariant: every lowered call computes what the ATen
call did (same positional arguments; dropped trailing arguments are ATen-only flags).
"""
from __future__ import annotations

import torch
import torch.fx

from .aten_rules import ATEN_AS_FUNCTION, ATEN_LIKE_METHOD, NOT_AS_METHOD

__all__ = ["lower_to_torch"]

aten = torch.ops.aten
_ATEN_ONLY_KWARGS = {"implicit": False}  # aten.expand's flag: torch's default


def _tables():
    functions, methods = {}, {}
    for spec, entry in ATEN_AS_FUNCTION.items():
        packet, _, name = spec.partition(".")
        op = getattr(getattr(aten, packet, None), name, None)
        if op is not None:
            functions[op] = entry
    for packet_name in ATEN_LIKE_METHOD:
        packet = getattr(aten, packet_name, None)
        if packet is None or packet_name in NOT_AS_METHOD or not hasattr(torch.Tensor, packet_name):
            continue
        for name in packet.overloads():
            op = getattr(packet, name)
            if op not in functions:
                methods[op] = packet_name
    return functions, methods


_FUNCTIONS, _METHODS = _tables()


def lower_to_torch(gm: torch.fx.GraphModule) -> int:
    """Lower the ATen calls of ``gm`` that have torch-level twins; return how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _FUNCTIONS:
            fn, n, extra = _FUNCTIONS[node.target]
            args = list(node.args[:n])
            if fn is torch.einsum:  # (equation, [operands]) is torch.einsum's form too
                args = [args[0], list(args[1])]
            node.target, node.args = fn, tuple(args)
            node.kwargs = {**node.kwargs, **extra}
            count += 1
        elif node.target in _METHODS and node.args and isinstance(node.args[0], torch.fx.Node):
            kwargs = {k: v for k, v in node.kwargs.items()
                      if not (k in _ATEN_ONLY_KWARGS and v == _ATEN_ONLY_KWARGS[k])}
            if set(kwargs) & set(_ATEN_ONLY_KWARGS):
                continue
            node.op, node.target, node.kwargs = "call_method", _METHODS[node.target], kwargs
            count += 1
    gm.recompile()
    return count
