"""Per-node records of the OBA surrogate's backward (design §5.1).

The forward pass of :mod:`.oba` leaves one record per executed bilinear node. During the
cotangent pass a backward hook on the record's live output (``hooked``: Y of a layer, z
of a bilinear node) receives the loss cotangent there and at once turns it into the
surrogate's "cotangent injections" (local vector-Jacobian products with the tangents in
place of one operand) or direct weight terms, which it leaves in an :class:`Injections`;
then the record drops its tangents and operands (``release``), so tangents never outlive
their use. A fast layer's upward injection is the cotangent of its input alias
(``alias``), which the cotangent pass captures itself. Contract: records hold detached
copies of the operands they need; ``on_cotangent`` only adds to the sink it is given.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .oba_graph import GraphPlan, Layer
from .oba_ops import detach_tree as _detach
from .oba_ops import tangent


class Injections:
    """What the records leave during the cotangent pass: direct weight terms, handed at
    once to ``add_direct(δθ name, term)`` (which folds them into the score sums), and
    ``outs``/``couts``, the (live tensor, cotangent) pairs the injection pass carries back
    to the parameters."""

    def __init__(self, add_direct: Callable[[str, Tensor], None]):
        self.add_direct = add_direct
        self.outs: List[Tensor] = []
        self.couts: List[Tensor] = []

    def inject(self, at: Tensor, cot: Tensor) -> None:
        """Inject cotangent ``cot`` at the live tensor ``at``."""
        self.outs.append(at)
        self.couts.append(cot)


def make_record(plan: GraphPlan, node, ex, largs, lkw, value, dargs):
    """The record of an executed bilinear node (None when it contributes nothing)."""
    layer = plan.layers.get(node)
    if layer is not None and layer.fast:
        d_w = None if plan.delta is None else plan.delta_of(layer_weight(layer, largs))
        return _LayerRec(layer, ex, largs, lkw, value, tangent(dargs[layer.x]),
                         plan.dtheta[layer.weight], plan.delta is not None, d_w)
    slots = plan.bilinear.get(node)
    if slots is None:
        return None
    u, v = largs[slots[0]], largs[slots[1]]
    if not (isinstance(u, Tensor) and isinstance(v, Tensor) and isinstance(value, Tensor)):
        return None
    rec = _BilinearRec(ex, slots, layer.b if layer is not None else None, largs, lkw,
                       value, tangent(dargs[slots[0]]), tangent(dargs[slots[1]]))
    return rec if (rec.need_u or rec.need_v) else None


def layer_weight(layer: Layer, largs) -> Tensor:
    """The live weight of a fast parameter layer (its module's, or its weight slot's)."""
    return layer.module.weight if layer.module is not None else largs[layer.w]


def layer_call(layer: Layer, ex, largs, lkw, x: Tensor, w: Tensor,
               b: Optional[Tensor]) -> Tensor:
    """The fast layer's op ``F(x; w) + b`` with the given input, weight and bias (no bias
    when ``b`` is None), every other argument as in the graph (detached)."""
    mod = layer.module
    if mod is not None:
        params = {"weight": w}
        if mod.bias is not None:
            params["bias"] = b if b is not None else torch.zeros_like(mod.bias.detach())
        return torch.func.functional_call(mod, params, (x,))
    full = [_detach(a) for a in largs]
    full[layer.x], full[layer.w] = x, w
    if layer.b is not None:
        full[layer.b] = b
    return ex.fn(*full, **_detach(lkw))


def general_layer_tangent(plan: GraphPlan, layer: Layer, ex, largs, lkw,
                          t_x: Optional[Tensor], value: Tensor) -> Tensor:
    """``T_Y = F(T_X; W) + F(X; δW) + δb`` of a fast layer for a general δθ (the
    ``δθ = θ`` shortcut ``F(X + T_X; W) + b`` does not hold). Runs under no_grad."""
    weight = layer_weight(layer, largs)
    bias = layer.module.bias if layer.module is not None else (
        largs[layer.b] if layer.b is not None else None)
    w, d_w, d_b = weight.detach(), plan.delta_of(weight), plan.delta_of(bias)
    t_y = torch.zeros_like(value.detach())
    if t_x is not None:
        t_y = t_y + layer_call(layer, ex, largs, lkw, t_x, w, None)
    if d_w is not None or d_b is not None:
        x = _detach(largs[layer.x])
        t_y = t_y + layer_call(layer, ex, largs, lkw, x,
                               d_w if d_w is not None else torch.zeros_like(w), d_b)
    return t_y


def _local_vjp(call: Callable, operands: list, which: int, cot: Tensor) -> Tensor:
    """VJP of ``call(*operands)`` w.r.t. ``operands[which]`` at ``cot`` (operands are
    detached; the op is linear in the differentiated operand)."""
    ops = list(operands)
    ops[which] = ops[which].detach().requires_grad_(True)
    with torch.enable_grad():
        out = call(*ops)
    return torch.autograd.grad(out, ops[which], cot)[0]


class _LayerRec:
    """A parameter layer ``Y = F(X; W) + b`` with W used directly: its downward term
    ``VJP_W[F(T_X; ·)](g_Y)`` goes straight to W, its upward term is the backward message
    from Y to the alias of X (injected there)."""

    def __init__(self, layer: Layer, ex, largs, lkw, y, t_x, weight: Tensor,
                 general: bool = False, d_w: Optional[Tensor] = None):
        self.layer, self.ex, self.y, self.t_x, self.weight = layer, ex, y, t_x, weight
        # general: δθ ≠ θ, so the upward term VJP_X[F(·; δW)](g_Y) is computed here
        # (it is no longer the backward message to X); it vanishes where δW = 0.
        self.general, self.d_w = general, d_w
        self.x = largs[layer.x]
        self.up = (isinstance(self.x, Tensor) and self.x.requires_grad
                   and (not general or d_w is not None))
        self.need_y = t_x is not None or (general and self.up)
        self.args = [_detach(a) for a in largs] if self.need_y else None
        self.kwargs = _detach(lkw) if self.need_y else None

    @property
    def hooked(self) -> Optional[Tensor]:
        """The live tensor whose cotangent this record reads (Y), or None."""
        return self.y if self.need_y and self.y is not None and self.y.requires_grad else None

    @property
    def alias(self) -> Optional[Tensor]:
        """The input alias whose cotangent is this layer's upward injection (δθ = θ)."""
        return self.x if self.up and not self.general else None

    def on_cotangent(self, g_y: Tensor, sink: Injections) -> None:
        """Given ``g_Y``: the direct weight term ``VJP_W[F(T_X; ·)](g_Y)`` and, for a
        general δθ, the upward injection ``VJP_X[F(·; δW)](g_Y)`` at X; then release."""
        if self.t_x is not None:
            sink.add_direct(self.layer.weight, self._weight_vjp(g_y))
        if self.general and self.up:
            sink.inject(self.x, self._input_vjp(g_y))
        self.release()

    def release(self) -> None:
        """Drop the tangent and the operands (after the cotangent pass)."""
        self.t_x = self.args = self.kwargs = self.y = None

    def _input_vjp(self, g_y: Tensor) -> Tensor:
        """``VJP_X[F(·; δW)](g_Y)``: an input gradient with δW in place of W."""
        mod, d_w, x = self.layer.module, self.d_w, self.x.detach()
        if isinstance(mod, nn.Linear):
            return g_y @ d_w
        if (isinstance(mod, nn.modules.conv._ConvNd) and mod.padding_mode == "zeros"
                and not isinstance(mod.padding, str) and x.dim() == d_w.dim()):
            return torch.ops.aten.convolution_backward(
                g_y, x, d_w, None, mod.stride, mod.padding, mod.dilation, mod.transposed,
                mod.output_padding, mod.groups, [True, False, False])[0]
        return _local_vjp(lambda a: layer_call(self.layer, self.ex, self.args, self.kwargs,
                                               a, d_w, None), [x], 0, g_y)

    def _weight_vjp(self, g_y: Tensor) -> Tensor:
        """``VJP_W[F(T_X; ·)](g_Y)``: a weight gradient with T_X in place of X."""
        mod, t_x, w = self.layer.module, self.t_x, self.weight.detach()
        if isinstance(mod, nn.Linear):
            return g_y.reshape(-1, g_y.shape[-1]).t() @ t_x.reshape(-1, t_x.shape[-1])
        if (isinstance(mod, nn.modules.conv._ConvNd) and mod.padding_mode == "zeros"
                and not isinstance(mod.padding, str) and t_x.dim() == w.dim()):
            return torch.ops.aten.convolution_backward(
                g_y, t_x, w, None, mod.stride, mod.padding, mod.dilation, mod.transposed,
                mod.output_padding, mod.groups, [False, True, False])[1]
        if mod is not None:
            return _local_vjp(lambda a: torch.func.functional_call(mod, {"weight": a},
                                                                   (t_x,)), [w], 0, g_y)
        args, kw, lay = self.args, self.kwargs, self.layer

        def call(a):
            full = list(args)
            full[lay.x], full[lay.w] = t_x, a
            if lay.b is not None:
                full[lay.b] = None
            return self.ex.fn(*full, **kw)
        return _local_vjp(call, [w], 0, g_y)


class _BilinearRec:
    """A bilinear node ``z = u ⋆ v``: injects ``VJP_u[· ⋆ T_v](g_z)`` at u and
    ``VJP_v[T_u ⋆ ·](g_z)`` at v."""

    def __init__(self, ex, slots, bias, largs, lkw, z, t_u, t_v):
        self.ex, self.slots, self.bias, self.z, self.t_u, self.t_v = (
            ex, slots, bias, z, t_u, t_v)
        self.u, self.v = largs[slots[0]], largs[slots[1]]
        self.need_u = t_v is not None and self.u.requires_grad
        self.need_v = t_u is not None and self.v.requires_grad
        self.args, self.kwargs = [_detach(a) for a in largs], _detach(lkw)

    def _call(self, a: Tensor, b: Tensor) -> Tensor:
        """The node's op with operands ``a``, ``b`` (and no bias)."""
        full = list(self.args)
        full[self.slots[0]], full[self.slots[1]] = a, b
        if self.bias is not None:
            full[self.bias] = None
        return self.ex.fn(*full, **self.kwargs)

    @property
    def hooked(self) -> Optional[Tensor]:
        """The live tensor whose cotangent this record reads (z), or None."""
        return self.z if self.z is not None and self.z.requires_grad else None

    alias = None

    def on_cotangent(self, g: Tensor, sink: Injections) -> None:
        """Given ``g_z``: inject the (operand, local VJP) pairs; then release."""
        plain = self._plain_matmul()
        if self.need_u:
            sink.inject(self.u, g @ self.t_v.transpose(-2, -1) if plain
                        else _local_vjp(self._call, [self.u, self.t_v], 0, g))
        if self.need_v:
            sink.inject(self.v, self.t_u.transpose(-2, -1) @ g if plain
                        else _local_vjp(self._call, [self.t_u, self.v], 1, g))
        self.release()

    def release(self) -> None:
        """Drop the tangents and the operands (after the cotangent pass)."""
        self.t_u = self.t_v = self.args = self.kwargs = self.z = None

    def _plain_matmul(self) -> bool:
        """A matmul/bmm without broadcasting: its VJPs are one product each."""
        name = getattr(self.ex.fn, "__name__", "")
        u, v = self.u, self.v
        return (name in ("matmul", "bmm") and self.slots == [0, 1] and u.dim() >= 2
                and u.dim() == v.dim() and u.shape[:-2] == v.shape[:-2])
