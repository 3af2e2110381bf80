"""Connectivity pass: series / parallel relations between parameter layers (design §4).

Contract: reads a traced GraphModule (no shapes needed); returns a
:class:`Connectivity`; changes nothing. Parameter layers are Conv/Linear modules and
functional conv/linear/matmul nodes with a parameter operand. ``series``: a directed
path runs from one layer's output to the other's input. ``parallel``: no such path,
but their outputs reach the two operands of one product of two activation-dependent
tensors (Q·Kᵀ, P·V, gating). Everything else, and a layer with itself, is ``None``.
``within``: the layers with a *within-layer* parallel term -- one layer's own output
reaches two operands of one such product through no other parameter layer (a fused
qkv's Q·Kᵀ and P·V, a gate computed from a slice of the gated layer). OBA scores that
product's curvature in the layer's own block H̃[l, l]; it is listed apart because
``kind(l, l)`` stays ``None`` (design §4). Layers further upstream of both operands
also get diagonal curvature from the product, through the layers in between; like a
series pair that also meets at a product, they are not listed.
Reachability is computed once for all layers with bitsets over a networkx DiGraph,
one sweep forward (ancestors) and one backward (descendants) in topological order,
so the cost is linear in graph size times layers/64.
"""
from __future__ import annotations

import operator
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import networkx as nx
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .rule_table import canonical

_LAYER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear, nn.Bilinear)
_LAYER_FUNCTIONS = {F.linear, torch._C._nn.linear, F.conv1d, F.conv2d, F.conv3d,
                    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_PRODUCTS = {operator.mul, operator.matmul, torch.mul, torch.matmul, torch.bmm, torch.einsum,
             operator.imul, F.scaled_dot_product_attention, torch.mm}
_PRODUCT_METHODS = {"mul", "mul_", "matmul", "bmm", "mm"}


class Connectivity:
    """``kind(a, b)`` for two parameter layers named by module path (or node name)."""

    def __init__(self, layers: List[str], series: Dict[str, int], index: Dict[str, int],
                 parallel: set, within: Iterable[str] = ()):
        self.layers = layers
        self._desc = series       # layer -> bitset of layers downstream of it
        self._index = index
        self._parallel = parallel
        # layers in graph order whose own output meets itself in a product
        self.within = [name for name in layers if name in set(within)]

    def kind(self, a: str, b: str) -> Optional[str]:
        for name in (a, b):
            if name not in self._index:
                raise KeyError(f"{name!r} is not a parameter layer; known layers: "
                               f"{', '.join(self.layers[:8])}...")
        if a == b:
            return None
        ia, ib = self._index[a], self._index[b]
        if (self._desc[a] >> ib) & 1 or (self._desc[b] >> ia) & 1:
            return "series"
        if (min(a, b), max(a, b)) in self._parallel:
            return "parallel"
        return None

    def pairs(self, kind: str) -> Iterator[Tuple[str, str]]:
        for i, a in enumerate(self.layers):
            for b in self.layers[i + 1:]:
                if self.kind(a, b) == kind:
                    yield a, b

    def table(self) -> str:
        counts = {k: sum(1 for _ in self.pairs(k)) for k in ("series", "parallel")}
        line = (f"{len(self.layers)} parameter layers: {counts['series']} series pairs, "
                f"{counts['parallel']} parallel pairs, {len(self.within)} within-layer "
                "parallel terms")
        if self.within:
            shown = ", ".join(self.within[:4])
            more = f" and {len(self.within) - 4} more" if len(self.within) > 4 else ""
            line += f" (a layer's output multiplied by itself, e.g. a fused qkv: {shown}{more})"
        return line


def layer_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Optional[str]:
    """Name of the parameter layer computed at ``node``, or None."""
    if node.op == "call_module":
        return node.target if isinstance(gm.get_submodule(node.target), _LAYER_MODULES) else None
    if node.op == "call_function" and canonical(node.target) in _LAYER_FUNCTIONS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
            return weight.target.rsplit(".", 1)[0]
        return node.name
    if _is_product(node) and any(isinstance(a, torch.fx.Node) and a.op == "get_attr"
                                 for a in node.args[:2]):
        return node.name
    return None


def _is_product(node: torch.fx.Node) -> bool:
    return ((node.op == "call_function" and canonical(node.target) in _PRODUCTS)
            or (node.op == "call_method" and node.target in _PRODUCT_METHODS))


def build_connectivity(gm: torch.fx.GraphModule) -> Connectivity:
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node)
        for inp in node.all_input_nodes:
            graph.add_edge(inp, node)
    layers, index, bit_of_node = [], {}, {}
    for node in gm.graph.nodes:
        name = layer_name(node, gm)
        if name is not None and name not in index:
            index[name] = len(layers)
            layers.append(name)
        if name is not None:
            bit_of_node[node] = 1 << index[name]
    # upstream[n]: layers whose output reaches n (n's own layer included);
    # live[n]: n depends on a model input (an activation, not a constant).
    # anc[j] / desc[name]: layers upstream / downstream of a layer, from one forward and
    # one backward sweep in topological order (no per-pair bit loops).
    order = list(nx.topological_sort(graph))
    upstream: Dict[torch.fx.Node, int] = {}
    live: Dict[torch.fx.Node, bool] = {}
    anc = [0] * len(layers)
    for node in order:
        preds = list(graph.predecessors(node))
        up = 0
        for p in preds:
            up |= upstream[p]
        live[node] = node.op == "placeholder" or any(live[p] for p in preds)
        if node in bit_of_node:
            own = bit_of_node[node]
            anc[own.bit_length() - 1] |= up & ~own
            up |= own
        upstream[node] = up
    downstream: Dict[torch.fx.Node, int] = {}
    desc = {name: 0 for name in layers}
    for node in reversed(order):
        down = 0
        for succ in graph.successors(node):
            down |= downstream[succ] | bit_of_node.get(succ, 0)
        downstream[node] = down
        if node in bit_of_node:
            own = bit_of_node[node]
            desc[layers[own.bit_length() - 1]] |= down & ~own
    # related[i]: layers in series with layer i, and i itself.
    related = [desc[name] | anc[i] | (1 << i) for i, name in enumerate(layers)]
    near = _nearest_layers(order, graph, bit_of_node)
    parallel: set = set()
    seen: set = set()
    within = 0
    for node in gm.graph.nodes:
        if _is_product(node) and node not in bit_of_node:
            operands = [a for a in node.all_input_nodes if live.get(a)]
            if len(operands) >= 2:
                _add_parallel(parallel, seen, layers, related, [upstream[o] for o in operands])
                within |= _shared_bits([near[o] for o in operands])
    return Connectivity(layers, desc, index, parallel, [layers[i] for i in _bits(within)])


def _nearest_layers(order, graph: nx.DiGraph, bit_of_node) -> Dict[torch.fx.Node, int]:
    """``near[n]``: layers whose output *value* reaches ``n`` through no other parameter
    layer (a layer node's own bit only: its output starts a fresh path). Shape queries
    (``x.shape``, ``x.size()``, and arithmetic on them) carry no value: ``b, n, c =
    x.shape`` feeding a reshape of q must not make x's layer an operand of Q·Kᵀ."""
    near: Dict[torch.fx.Node, int] = {}
    shape: set = set()
    for node in order:
        preds = list(graph.predecessors(node))
        if _is_shape_query(node) or (preds and node.op == "call_function"
                                     and all(p in shape for p in preds)):
            shape.add(node)
            near[node] = 0
        elif node in bit_of_node:
            near[node] = bit_of_node[node]
        else:
            mask = 0
            for p in preds:
                mask |= near[p]
            near[node] = mask
    return near


def _is_shape_query(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    return (node.op == "call_function" and node.target is getattr
            and len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device"))


def _shared_bits(masks: List[int]) -> int:
    """Bits set in at least two of ``masks``."""
    seen = shared = 0
    for mask in masks:
        shared |= seen & mask
        seen |= mask
    return shared


def _add_parallel(parallel: set, seen: set, layers, related, masks) -> None:
    """Pairs (one layer upstream of each operand) not related in series. Operand masks
    repeat (q, k and v of one attention share their upstream layers): each pair of
    masks is examined once."""
    for k, left in enumerate(masks):
        for right in masks[k + 1:]:
            if (left, right) in seen:
                continue
            seen.add((left, right))
            for i in _bits(left):
                for j in _bits(right & ~related[i]):
                    a, b = layers[i], layers[j]
                    parallel.add((min(a, b), max(a, b)))


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
