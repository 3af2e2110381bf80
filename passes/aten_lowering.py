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

Grad-mode blocks: export captures a ``with torch.no_grad():`` block inside ``forward`` as
the higher-order op ``wrap_with_set_grad_enabled(False, submod, *operands)`` over a
submodule of its own (the rotary-embedding tables of timm's gemma4 ViT). Lowering inlines
the submodule's graph in its place, so the channel rules see its ops, and detaches each
output of a grad-disabled block: reverse-mode gradients (scoring) stop at the block's
outputs exactly as under ``no_grad``; a block that enables grad is inlined as is (the
captured program runs for inference and scoring, where grad is on). One difference:
``no_grad`` does not stop forward-mode tangents, ``detach`` does; it matters only where
the block reads a parameter, and no such block has been met.

Contract: reads and rewrites ``gm.graph`` in place (targets, ops and arguments of call
nodes; grad-mode blocks inlined and their submodules deleted), then recompiles. Invariant: every lowered call computes what the ATen
call did (same positional arguments; dropped trailing arguments are ATen-only flags).
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from ..errors import TraceError
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
    count = _inline_grad_mode_blocks(gm)
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


def _grad_mode_op():
    return getattr(getattr(torch.ops, "higher_order", None), "wrap_with_set_grad_enabled", None)


def _inline_grad_mode_blocks(gm: torch.fx.GraphModule) -> int:
    """Inline every ``wrap_with_set_grad_enabled`` block (module docstring); its nested
    blocks first. Returns how many blocks were inlined."""
    op = _grad_mode_op()
    hops = [n for n in gm.graph.nodes if op is not None and n.op == "call_function"
            and n.target is op]
    count = 0
    for node in hops:
        enabled, sub_node, *operands = node.args
        sub = getattr(gm, sub_node.target)
        count += _inline_grad_mode_blocks(sub) + 1
        with gm.graph.inserting_before(node):
            outputs = _copy_body(gm, sub, sub_node.target, operands)
            if not enabled:
                outputs = [gm.graph.call_function(aten.detach.default, (o,))
                           if isinstance(o, torch.fx.Node) else o for o in outputs]
        for user in list(node.users):
            if user.target is not operator.getitem or user.args[0] is not node:
                raise TraceError(f"the torch.export graph uses the outputs of the no_grad "
                                 f"block {node.name} other than by index ({user.format_node()}); "
                                 "use the FX front end (frontend='fx')")
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
            gm.delete_submodule(sub_node.target)
    return count


def _copy_body(gm: torch.fx.GraphModule, sub: torch.fx.GraphModule, prefix: str,
               operands) -> list:
    """Copy ``sub``'s nodes into ``gm``'s graph at the insertion point, its placeholders
    bound to ``operands``; ``get_attr`` targets of ``sub`` become attributes of ``gm``
    under ``prefix_name``. Returns the values ``sub`` returns, as a list."""
    env = {}
    placeholders = iter(operands)
    outputs: list = []
    for inner in sub.graph.nodes:
        if inner.op == "placeholder":
            env[inner] = next(placeholders)
        elif inner.op == "output":
            result = torch.fx.node.map_arg(inner.args[0], lambda n: env[n])
            outputs = list(result) if isinstance(result, (tuple, list)) else [result]
        elif inner.op == "get_attr":
            name = f"{prefix}_{inner.target.replace('.', '_')}"
            setattr(gm, name, _fetch_attr(sub, inner.target))
            env[inner] = gm.graph.get_attr(name)
            env[inner].meta = dict(inner.meta)
        else:
            env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
    return outputs


def _fetch_attr(module: torch.nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module
