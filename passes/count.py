"""Counting pass: FLOPs and parameters, dense and under any keep mask (design §6).

Contract: :func:`cost_model` counts every node of the analysed graph as
:func:`.shape_flops.flop_counter` counts it (``FlopCounterMode`` plus the CPU attention
kernel's formula it lacks; so dense counts are exactly what
that counter reports: from the propagated shapes, :mod:`.shape_flops`, else by running
the graph node by node on fake tensors) and records for every FLOP-bearing node the labels of the
dims its cost is proportional to (its output dims plus its contracted input dim).
Under a keep mask a node's FLOPs scale by the kept fraction of each such dim, and
a parameter's size by the kept fraction of each recorded dim. Both are exact for
conv / linear / matmul / attention, which is what selection needs; the slim model
is re-counted independently to check. Latency (the ``latency`` budget) is costed by
the per-layer table of :mod:`.latency_table`, measured only when first asked for.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from ..errors import BudgetError
from .groups import LABEL_KEY, Analysis
from .labels import TLabel
from .latency_table import LatencyTable, measure_table
from .rule_table import RuleTable
from .shape_flops import flop_counter, node_flops


def count_flops(module: torch.nn.Module, inputs: Tuple[Any, ...]) -> int:
    """Total FLOPs of one forward pass, as FlopCounterMode counts them (on fake
    tensors when possible: same count, no arithmetic)."""
    def run(args):
        counter = flop_counter()
        with torch.no_grad(), counter:
            module(*args)
        return int(counter.get_total_flops())
    return _with_fake_inputs(run, inputs)


def _with_fake_inputs(fn, inputs: Tuple[Any, ...]):
    """``fn(inputs)`` under FakeTensorMode, falling back to real tensors for ops that
    have no fake implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = tuple(mode.from_tensor(x) if torch.is_tensor(x) else x for x in inputs)
            return fn(fake)
    except Exception:  # noqa: BLE001 - any fake-mode gap: count for real
        return fn(inputs)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class CostModel:
    node_flops: List[Tuple[int, List[np.ndarray]]] = field(default_factory=list)
    param_dims: List[Tuple[int, List[np.ndarray]]] = field(default_factory=list)
    dense_flops: int = 0
    dense_params: int = 0

    def flops(self, keep: np.ndarray) -> float:
        return _Terms.of(self.node_flops, self._term_cache).total(keep) + self._fixed_flops

    def params(self, keep: np.ndarray) -> float:
        return _Terms.of(self.param_dims, self._term_cache).total(keep)

    def latency(self, keep: np.ndarray) -> float:
        """Predicted latency (ms) under ``keep``: the per-layer latency table
        (:mod:`.latency_table`), measured on the model's device on first use."""
        return self.latency_model().cost(keep)

    @property
    def dense_latency(self) -> float:
        return self.latency_model().dense_ms

    def latency_model(self) -> LatencyTable:
        """The latency table, measured now unless it already is (or was injected)."""
        if self.latency_table is None:
            if self._measure_latency is None:
                raise BudgetError("this cost model has no latency table: build it with "
                                  "cost_model(analysis, inputs) to measure one")
            self.latency_table = self._measure_latency()
        return self.latency_table

    _fixed_flops: int = 0
    latency_table: Optional[LatencyTable] = None   # None until a latency budget needs it
    _measure_latency: Optional[Callable[[], LatencyTable]] = None
    _term_cache: Dict[int, "_Terms"] = field(default_factory=dict, repr=False, compare=False)


def _fraction_product(arrays: List[np.ndarray], keep: np.ndarray) -> float:
    """Product over ``arrays`` of each one's kept fraction (ids -1: always kept)."""
    frac = 1.0
    for ids in arrays:
        alive = np.where(ids >= 0, keep[np.maximum(ids, 0)], True)
        frac *= alive.mean()
    return frac


class _Terms:
    """``sum(size * _fraction_product(arrays, keep) for size, arrays in terms)`` with the
    same floating-point operations in the same order, but one gather for all the ids:
    they are concatenated once (-1 -> a trailing always-kept slot), the kept counts per
    array are one ``add.reduceat``, and only the per-term products and the sum run in
    Python (left to right, as the original). Built once per term list
    (:meth:`of`: rebuilt if the list is replaced or changes length)."""

    def __init__(self, terms: List[Tuple[int, List[np.ndarray]]]):
        self.source, self.length = terms, len(terms)
        arrays = [ids for _, term in terms for ids in term]
        self.sizes = [size for size, _ in terms]
        self.widths = [len(term) for _, term in terms]   # arrays per term
        lengths = np.array([ids.size for ids in arrays], dtype=np.int64)
        self.empty = bool((lengths == 0).any())          # mean of nothing: keep the original
        self.lengths = lengths.astype(np.float64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.ids = (np.concatenate([ids.ravel() for ids in arrays]).astype(np.int64)
                    if arrays else np.zeros(0, dtype=np.int64))
        self._slots: Tuple[int, np.ndarray] = (-1, self.ids)   # (mask length, gather ids)

    @classmethod
    def of(cls, terms, cache: Dict[int, "_Terms"]) -> "_Terms":
        hit = cache.get(id(terms))
        if hit is None or hit.source is not terms or hit.length != len(terms):
            hit = cache[id(terms)] = cls(terms)
        return hit

    def total(self, keep: np.ndarray) -> float:
        if self.empty or not self.ids.size:
            return sum(n * _fraction_product(arrays, keep) for n, arrays in self.source)
        if self._slots[0] != keep.size:   # -1 -> the slot after the mask
            self._slots = (keep.size, np.where(self.ids >= 0, self.ids, keep.size))
        kept = np.add.reduceat(np.append(keep, True)[self._slots[1]], self.starts,
                               dtype=np.int64)
        fractions = (kept / self.lengths).tolist()
        total, at = 0, 0
        for size, width in zip(self.sizes, self.widths):
            frac = 1.0
            for f in fractions[at:at + width]:
                frac *= f
            total = total + size * frac
            at += width
        return total


class _FlopInterpreter(torch.fx.Interpreter):
    """Runs the graph, counting FLOPs of each node separately."""

    def __init__(self, gm):
        super().__init__(gm)
        self.per_node: Dict[torch.fx.Node, int] = {}

    def run_node(self, n):
        counter = flop_counter()
        with counter:
            out = super().run_node(n)
        flops = int(counter.get_total_flops())
        if flops:
            self.per_node[n] = flops
        return out


def dense_node_flops(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]
                     ) -> Dict[torch.fx.Node, int]:
    """``{node: FLOPs}`` of the nodes with FLOPs: from the shapes already propagated on
    ``inputs`` (:mod:`.shape_flops`), else by running the graph on fake tensors."""
    per_node = node_flops(gm, inputs)
    if per_node is not None:
        return per_node

    def run(args):
        interp = _FlopInterpreter(gm)
        with torch.no_grad():
            interp.run(*args)
        return interp
    return _with_fake_inputs(run, inputs).per_node


def cost_model(analysis: Analysis, inputs: Tuple[Any, ...]) -> CostModel:
    gm = analysis.gm
    per_node = dense_node_flops(gm, inputs)
    model = CostModel()
    fixed = 0
    for node, flops in per_node.items():
        arrays = _cost_dims(node)
        if arrays:
            model.node_flops.append((flops, arrays))
        else:
            fixed += flops
    model._fixed_flops = fixed
    model.dense_flops = sum(per_node.values())
    dims_of: Dict[str, List[np.ndarray]] = {}   # parameter -> its dims' ids, in record order
    for (target, _), rec in analysis.space.records.items():
        dims_of.setdefault(target, []).append(rec.ids)
    for name, p in gm.named_parameters():
        model.param_dims.append((p.numel(), list(dims_of.get(name, []))))
    model.dense_params = sum(p.numel() for p in gm.parameters())
    model._measure_latency = lambda: measure_table(analysis, inputs)
    return model


def _cost_dims(node: torch.fx.Node) -> List[np.ndarray]:
    """Labels of the dims a node's FLOPs are proportional to."""
    out = node.meta.get(LABEL_KEY)
    arrays = _label_arrays(out)
    contracted = _contracted_label(node)
    if contracted is not None:
        arrays.append(contracted)
    return arrays


def _label_arrays(label: Any) -> List[np.ndarray]:
    if not isinstance(label, TLabel):
        return []
    arrays = [d for d in label.dims if d is not None]
    if label.grid is not None:
        arrays.append(label.grid.ids.ravel())
    return arrays


#: Per op: ``contracted(node, x_label) -> ids or None``, the input dim whose kept
#: fraction scales the op's FLOPs besides its output dims (a product's summed dim).
CONTRACTED = RuleTable("FLOPs contracted dim")


def _contracted_label(node: torch.fx.Node) -> Optional[np.ndarray]:
    """The input dim a product sums over (:data:`CONTRACTED`)."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    x = node.args[0].meta.get(LABEL_KEY)
    if not isinstance(x, TLabel) or x.grid is not None:
        return None
    rule = CONTRACTED.lookup(node, node.graph.owning_module)
    return rule(node, x) if rule is not None else None


@CONTRACTED.module(torch.nn.Linear)
@CONTRACTED.function(F.linear, torch.matmul, torch.bmm, torch.mm, operator.matmul,
                     F.scaled_dot_product_attention)
@CONTRACTED.method("matmul", "bmm", "mm")
def _last_dim(node: torch.fx.Node, x: TLabel) -> Optional[np.ndarray]:
    """Linear, matmul and attention sum over the last input dim."""
    return x.dims[-1]


@CONTRACTED.function(torch.ops.aten.addmm.default, torch.addmm)
def _addmm_inner(node: torch.fx.Node, x: TLabel) -> Optional[np.ndarray]:
    """``addmm(bias, mat1, mat2)`` sums over ``mat1``'s last dim (``x`` is the bias)."""
    mat1 = node.args[1] if len(node.args) > 1 else None
    label = mat1.meta.get(LABEL_KEY) if isinstance(mat1, torch.fx.Node) else None
    return label.dims[-1] if isinstance(label, TLabel) and label.grid is None else None


@CONTRACTED.module(torch.nn.modules.conv._ConvNd)
def _conv_module_in(node: torch.fx.Node, x: TLabel) -> Optional[np.ndarray]:
    """Convolutions sum over input channels (not for grouped convs: their per-group
    width is fixed)."""
    mod = node.graph.owning_module.get_submodule(node.target)
    return x.dims[1] if mod.groups == 1 else None


@CONTRACTED.function(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                     F.conv_transpose3d)
def _conv_function_in(node: torch.fx.Node, x: TLabel) -> Optional[np.ndarray]:
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return x.dims[1] if groups == 1 else None
