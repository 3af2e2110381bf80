"""Channel rule for ``einsum`` (``torch.einsum`` on the FX front end, ``aten.einsum`` on
the export front end): MaxViT's and CoAtNet's relative-position lookups, bilinear forms.

Each subscript letter is one index shared by every operand that carries it: its dims
couple index by index (a size-1 dim broadcasts and couples nothing), like an elementwise
op's. A letter in the output keeps its ids there; a letter summed over (absent from the
output) is contracted: coupled across the operands that carry it (matmul's K), and
blocked when only one operand carries it (a reduction over channels). Parameter operands
get matmul's roles: their output letters are produced, their contracted letters consumed.
Ellipses and repeated letters within one operand (diagonals) fail closed.

Contract: importing this module registers the rule; it reads input labels and writes
coupling, blocks and roles like every rule (:mod:`.rule_table`).
"""
from __future__ import annotations

import torch

from .labels import TLabel
from .layer_rules import Param
from .rule_table import RULES, RuleContext, shape_of, unknown_rule

__all__ = ["einsum_rule"]


def _parse(equation: str, n_operands: int):
    """(operand subscripts, output subscripts), or None for forms not handled."""
    eq = equation.replace(" ", "")
    if "." in eq:
        return None
    lhs, arrow, out = eq.partition("->")
    specs = lhs.split(",")
    if not arrow:  # implicit output: the letters used once, in alphabetical order
        letters = "".join(specs)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(specs) != n_operands or any(len(set(s)) != len(s) for s in specs + [out]):
        return None
    return specs, out


@RULES.function(torch.einsum, torch.ops.aten.einsum.default)
def einsum_rule(ctx: RuleContext):
    equation = ctx.arg(0, "equation")
    operands = ctx.node.args[1:] if not isinstance(ctx.arg(1, "tensors"), (list, tuple)) \
        else list(ctx.arg(1, "tensors"))
    parsed = _parse(equation, len(operands)) if isinstance(equation, str) else None
    shapes = [shape_of(o) for o in operands]
    if parsed is None or any(s is None for s in shapes) or ctx.out_shape is None:
        return unknown_rule(ctx)
    specs, out = parsed
    params = [Param(ctx, o) for o in operands]
    labels = [ctx.space.collapse(p.label) for p in params]
    sizes = {c: n for spec, shp in zip(specs, shapes) for c, n in zip(spec, shp) if n != 1}
    ids_of = {}
    for letter in dict.fromkeys("".join(specs)):
        carriers = [(k, spec.index(letter)) for k, spec in enumerate(specs) if letter in spec
                    and (shapes[k][spec.index(letter)] != 1 or sizes.get(letter, 1) == 1)]
        dims = [labels[k].dims[d] for k, d in carriers]
        tracked = [ids for ids in dims if ids is not None]
        for other in dims[1:]:
            ctx.space.union(dims[0], other, ctx.where)
        base = tracked[0] if tracked else None
        contracted = letter not in out
        if contracted and len(carriers) == 1:
            ctx.space.block(base, f"einsum sums over channels at {ctx.where}")
        for k, d in carriers:
            params[k].role(d, "consumer" if contracted else "producer")
        ids_of[letter] = None if contracted else base
    return TLabel([ids_of.get(c) if ctx.out_shape[i] != 1 else None
                   for i, c in enumerate(out)])
