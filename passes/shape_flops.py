"""FLOPs per node from the shapes already propagated (``node.meta["tensor_meta"]``).

Contract: :func:`node_flops` reads a GraphModule whose shapes :mod:`.shape_prop`
propagated on ``inputs`` and returns ``{node: FLOPs}`` for the nodes with non-zero FLOPs,
exactly what :func:`flop_counter` (``torch.utils.flop_counter.FlopCounterMode`` plus
the CPU attention kernel's formula it lacks) counts when the node runs on those shapes (the dense counts of :mod:`.count` are defined that way); or ``None`` when
the recorded shapes are not those of ``inputs`` (then the caller counts by running the
graph). It writes nothing. Three kinds of node (issue 17: counting the whole graph on
fake tensors was half of a ``compile(criterion="l2")``):

* **formula**: exact ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose*``, ``nn.Linear``,
  ``F.linear``, ``F.conv*d``, ``matmul`` / ``@`` / ``bmm`` / ``mm`` on operands of two or
  more dims: the counter's own formulas (``conv_flop_count``: output positions × kernel ×
  batch × C_out × C_in/groups × 2, bias not counted; a product: 2 × batch × n × k × m);
* **zero**: ops that never reach a counted ATen op (elementwise, norms, activations,
  pooling, reshapes, indexing, concatenation, softmax, reductions);
* **anything else** (attention kernels, whose count depends on the backend the
  dispatcher picks; leaf modules; user functions): that one node is run under the
  counter on fake tensors shaped like its recorded inputs, as the whole graph was before.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

__all__ = ["node_flops", "graph_flops", "flop_counter", "attention_flops"]


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Scaled dot-product attention's two products, Q·Kᵀ and P·V: ``2·N·L·S·(E + Ev)``
    for ``N`` the query's leading dims (batch × heads; grouped key/value heads broadcast
    to them), ``L``/``S`` the query/key lengths, ``E``/``Ev`` the query/value head dims:
    the count torch's counter gives the CUDA attention kernels."""
    *lead, length, e = query_shape
    return 2 * math.prod(lead) * length * key_shape[-2] * (e + value_shape[-1])


#: Attention kernels ``torch.utils.flop_counter`` has no formula for (it counts them as
#: 0): the CPU flash kernel that ``F.scaled_dot_product_attention`` dispatches to on the
#: CPU, so without this a timm ViT's attention products were free on the CPU and counted
#: on CUDA, and a FLOPs budget meant two things.
_EXTRA_FORMULAS = {getattr(torch.ops.aten, name): attention_flops
                   for name in ("_scaled_dot_product_flash_attention_for_cpu",
                                "_scaled_dot_product_attention_math_for_mps")
                   if hasattr(torch.ops.aten, name)}


def flop_counter() -> FlopCounterMode:
    """The FLOP counter every count of fxprune uses: ``FlopCounterMode`` (no display)
    with the formulas it lacks (:data:`_EXTRA_FORMULAS`)."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)

_ZERO_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.Mish, nn.ELU, nn.PReLU, nn.Softmax, nn.Identity, nn.Dropout, nn.Flatten,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d)
_ZERO_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.getitem,
    operator.iadd, operator.imul, operator.neg, operator.floordiv, operator.eq,
    operator.ne, operator.lt, operator.le, operator.gt, operator.ge, torch._assert,
    torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.stack, torch.flatten,
    torch.reshape, torch.permute, torch.transpose, torch.relu, torch.sigmoid, torch.tanh,
    torch.mean, torch.sum, torch.split, torch.chunk, torch.unbind, torch.squeeze,
    torch.unsqueeze, torch.softmax, getattr,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.leaky_relu, F.mish, F.softmax, F.dropout, F.layer_norm, F.batch_norm, F.group_norm,
    F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.pad}
_ZERO_METHODS = {
    "view", "reshape", "permute", "transpose", "flatten", "contiguous", "size", "dim",
    "unsqueeze", "squeeze", "expand", "split", "chunk", "unbind", "mean", "sum", "softmax",
    "add", "add_", "sub", "mul", "mul_", "div", "relu", "relu_", "sigmoid", "tanh", "to",
    "float", "type_as", "clone", "detach", "flip", "repeat", "t"}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d}
_PRODUCTS = {torch.matmul, operator.matmul, torch.bmm, torch.mm}
_PRODUCT_METHODS = {"matmul", "bmm", "mm"}


def graph_flops(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]) -> Optional[int]:
    """Total FLOPs of ``gm`` on ``inputs`` from its recorded shapes, or None."""
    per_node = node_flops(gm, inputs)
    return None if per_node is None else sum(per_node.values())


def node_flops(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]
               ) -> Optional[Dict[torch.fx.Node, int]]:
    """``{node: FLOPs}`` (non-zero only) from the recorded shapes (module docstring)."""
    values = _placeholder_values(gm, inputs)
    if values is None:
        return None
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
    out: Dict[torch.fx.Node, int] = {}
    fallback = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        flops = _formula(node, gm)
        if flops is None:
            if fallback is None:
                fallback = _NodeCounter(gm, device, values)
            flops = fallback.count(node)
            if flops is None:
                return None
        if flops:
            out[node] = flops
    return out


def _placeholder_values(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]
                        ) -> Optional[Dict[torch.fx.Node, Any]]:
    """The non-tensor values of the placeholders (given inputs, else their defaults), or
    None unless the recorded shapes and dtypes are those of ``inputs`` and every node has
    its shapes (none was added after the propagation)."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(holders) < len(inputs) or any(not n.args for n in holders[len(inputs):]):
        return None
    values: Dict[torch.fx.Node, Any] = {}
    for i, node in enumerate(holders):
        x = inputs[i] if i < len(inputs) else node.args[0]
        meta = node.meta.get("tensor_meta")
        if isinstance(x, torch.Tensor) != isinstance(meta, TensorMetadata):
            return None
        if isinstance(x, torch.Tensor):
            if tuple(meta.shape) != tuple(x.shape) or meta.dtype != x.dtype:
                return None
        else:
            values[node] = x
    if not all("type" in n.meta for n in gm.graph.nodes if n.op != "output"):
        return None
    return values


def _shape(arg: Any) -> Optional[Tuple[int, ...]]:
    meta = arg.meta.get("tensor_meta") if isinstance(arg, torch.fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _formula(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Optional[int]:
    """The node's FLOPs by formula, 0 for ops without FLOPs, None when unknown."""
    if node.op == "call_module":
        return _module_formula(gm.get_submodule(node.target), node)
    if node.op == "call_function":
        if node.target in _ZERO_FUNCTIONS:
            return 0
        if node.target is F.linear:
            return _linear(node, _weight_shape(node.args[1] if len(node.args) > 1
                                               else node.kwargs.get("weight")))
        if node.target in _CONV_FUNCTIONS:
            return _conv_function(node)
        if node.target in _PRODUCTS:
            return _product(node)
        return None
    if node.op == "call_method":
        if node.target in _ZERO_METHODS:
            return 0
        if node.target in _PRODUCT_METHODS:
            return _product(node)
    return None


def _module_formula(mod: nn.Module, node: torch.fx.Node) -> Optional[int]:
    kind = type(mod)
    if kind in _ZERO_MODULES:
        return 0
    if kind is nn.Linear:
        return _linear(node, tuple(mod.weight.shape))
    if kind in _CONV_MODULES or kind in _CONVT_MODULES:
        x, y = _shape(node.args[0]) if node.args else None, _shape(node)
        if x is None or y is None or node.kwargs or len(node.args) != 1:
            return None
        w = tuple(mod.weight.shape)
        if kind in _CONV_MODULES and x[1] != w[1] * mod.groups:
            return None  # shapes recorded before the module changed: count by running
        return conv_flop_count(list(x), list(w), list(y), transposed=kind in _CONVT_MODULES)
    return None


def _weight_shape(arg: Any) -> Optional[Tuple[int, ...]]:
    return _shape(arg)


def _linear(node: torch.fx.Node, w: Optional[Tuple[int, ...]]) -> Optional[int]:
    """``2 * prod(x.shape[:-1]) * in * out``: what ``addmm`` / ``mm`` count for a linear
    layer on an input of any rank (bias not counted)."""
    x = _shape(node.args[0]) if node.args else None
    if x is None or w is None or len(w) != 2 or len(x) < 2 or x[-1] != w[1]:
        return None
    return 2 * math.prod(x[:-1]) * w[0] * w[1]


def _conv_function(node: torch.fx.Node) -> Optional[int]:
    if len(node.args) < 2 or any(k not in ("bias", "stride", "padding", "dilation", "groups")
                                 for k in node.kwargs):
        return None
    x, w, y = _shape(node.args[0]), _shape(node.args[1]), _shape(node)
    if x is None or w is None or y is None:
        return None
    return conv_flop_count(list(x), list(w), list(y), transposed=False)


def _product(node: torch.fx.Node) -> Optional[int]:
    """A matrix product of operands with two or more dims: ``mm`` or ``bmm`` on the
    broadcast batch, ``2 * batch * n * k * m`` (1-D operands: unknown)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = _shape(node.args[0]), _shape(node.args[1])
    if a is None or b is None or len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
        return None
    if node.target in (torch.bmm, "bmm") and (len(a) != 3 or len(b) != 3):
        return None
    if node.target in (torch.mm, "mm") and (len(a) != 2 or len(b) != 2):
        return None
    try:
        batch = torch.broadcast_shapes(a[:-2], b[:-2])
    except RuntimeError:
        return None
    return 2 * math.prod(batch) * a[-2] * a[-1] * b[-1]


def _meta_spec(m: Any) -> Any:
    if isinstance(m, TensorMetadata):
        return (tuple(m.shape), m.dtype, tuple(m.stride), m.requires_grad)
    if isinstance(m, (tuple, list)):
        return tuple(_meta_spec(x) for x in m)
    if m is None or isinstance(m, (bool, int, float, str)):
        return m
    raise TypeError("not a recorded shape")


class _NodeCounter(torch.fx.Interpreter):
    """Runs single nodes under the FLOP counter on fake tensors made from the recorded
    shapes of their inputs (attributes: the module's own tensors, as before)."""

    def __init__(self, gm: torch.fx.GraphModule, device, values: Dict[torch.fx.Node, Any]):
        super().__init__(gm)
        self.values = values  # non-tensor placeholder values
        self.memo: Dict[tuple, Optional[int]] = {}
        from torch._subclasses.fake_tensor import FakeTensorMode
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.device = device if device is not None else torch.device("cpu")

    def count(self, node: torch.fx.Node) -> Optional[int]:
        """The node's FLOPs run alone (memoised for functions and methods on equal
        recorded inputs: one count for a ViT's twelve attention calls)."""
        key = self._key(node)
        if key is not None and key in self.memo:
            return self.memo[key]
        flops = self._run(node)
        if key is not None:
            self.memo[key] = flops
        return flops

    def _key(self, node: torch.fx.Node) -> Optional[tuple]:
        if node.op not in ("call_function", "call_method"):
            return None  # a module's own tensors take part
        try:
            spec = (node.op, node.target, self._spec(node.args), self._spec(node.kwargs))
            hash(spec)
            return spec
        except TypeError:
            return None

    def _spec(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            if a.op == "get_attr" or a in self.values:
                return ("node", a.name)
            return ("meta", _meta_spec(a.meta.get("tensor_meta")))
        if isinstance(a, (tuple, list)):
            return (type(a).__name__,) + tuple(self._spec(x) for x in a)
        if isinstance(a, dict):
            return ("dict",) + tuple((k, self._spec(v)) for k, v in sorted(a.items()))
        return a

    def _run(self, node: torch.fx.Node) -> Optional[int]:
        try:
            with self.mode:
                for arg in node.all_input_nodes:
                    self.env[arg] = self._stand_in(arg)
                counter = flop_counter()
                with torch.no_grad(), counter:
                    self.run_node(node)
            return int(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - a node that needs values: count by running all
            return None
        finally:
            self.env.clear()

    def _stand_in(self, arg: torch.fx.Node) -> Any:
        if arg.op == "get_attr":
            return self.fetch_attr(arg.target)
        if arg in self.values:
            return self.values[arg]
        meta = arg.meta.get("tensor_meta")
        if meta is None:
            raise ValueError(f"{arg.name}: no recorded tensor and no value")

        return self._make(meta)

    def _make(self, m: Any) -> Any:
        """A fake tensor for each recorded ``TensorMetadata`` (itself a tuple) in ``m``."""
        if isinstance(m, TensorMetadata):
            return torch.empty_strided(tuple(m.shape), tuple(m.stride), dtype=m.dtype,
                                       device=self.device)
        if isinstance(m, (tuple, list)):
            return type(m)(self._make(x) for x in m)
        if isinstance(m, dict):
            return {k: self._make(x) for k, x in m.items()}
        return m
