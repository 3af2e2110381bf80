"""Graph analysis behind the OBA scores (:mod:`fxprune.criteria.oba`).

:func:`build_plan` reads a GraphModule once and decides

* δθ: the parameters of the *parameter layers* -- Conv/Linear modules (``call_module``),
  functional ``linear``/``conv*`` nodes and matmul-like nodes with one parameter-only
  operand and one activation operand, a ``mul`` by a Conv/Linear weight, and the bias
  added right after a functional matmul layer. Other parameters (norm affine, LayerScale
  gamma, tokens, positional embeddings) are not in δθ: they act as constants of linear ops.
* the bilinear nodes: every parameter layer, and every multiplicative node (matmul, bmm,
  mm, mul, two-operand einsum, ``@``) whose two operands both depend on a graph input
  (attention products, gating, SE); at run time a node only counts when both operands
  are tensors.
* how to execute every node *out of place* (:func:`.oba_ops.resolve`), so autograd
  records and tangents stay intact; the user's graph and modules are never modified;
* the cheap tangent rule of every node that has one (:mod:`.oba_tangents`).

"""
from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ..passes.eval_mode import eval_mode
from ..passes.groups import fetch_attr
from . import oba_tangents
from .oba_ops import (LAYER_FUNCTIONS, LAYER_MODULES, MATMUL_FUNCTIONS, MATMUL_METHODS,
                      MUL_FUNCTIONS, MUL_METHODS, Exec, resolve)

log = logging.getLogger(__name__)


@dataclass
class Layer:
    """A parameter layer: ``x`` and ``w`` are argument slots of the input and the weight,
    ``b`` the bias slot (None when the bias is internal or absent), ``fast`` when its
    parameters are used directly (so ``T_Y = F(X + T_X; W) + b``), ``module`` for
    ``call_module`` layers, ``weight`` the δθ name of a directly used weight."""

    x: int
    w: Optional[int]
    b: Optional[int]
    fast: bool
    module: Optional[nn.Module] = None
    weight: Optional[str] = None


def _operands(node: Node, ex: Exec) -> Optional[List[int]]:
    """Slots of the two multiplied operands of a multiplicative node, else None."""
    if node.op == "call_function":
        if ex.fn is torch.einsum:
            if len(ex.nargs) > 3:
                log.warning("OBA: einsum %s has more than two operands; its curvature is "
                            "not modelled", node.name)
            return [1, 2] if len(ex.nargs) == 3 else None
        if ex.fn in MATMUL_FUNCTIONS | MUL_FUNCTIONS | LAYER_FUNCTIONS:
            return [0, 1] if len(ex.nargs) >= 2 else None
    if node.op == "call_method" and ex.fn.__name__ in MATMUL_METHODS | MUL_METHODS:
        return [0, 1] if len(ex.nargs) >= 2 else None
    return None


def _is_mul(node: Node, ex: Exec) -> bool:
    """True for an elementwise product node (``*``, ``torch.mul``, ``.mul``)."""
    if node.op == "call_method":
        return ex.fn.__name__ in MUL_METHODS
    return node.op == "call_function" and ex.fn in MUL_FUNCTIONS


class GraphPlan:
    """The result of :func:`build_plan`; see the module docstring."""

    def __init__(self, gm: nn.Module):
        self.gm = gm
        self.canon = {id(p): name for name, p in gm.named_parameters()}
        self.dtheta: Dict[str, nn.Parameter] = {}
        self.layers: Dict[Node, Layer] = {}
        self.bilinear: Dict[Node, List[int]] = {}
        self.execs: Dict[Node, Exec] = {}
        self.has_tangent: set = set()
        self.rules: Dict[Node, Callable] = {}
        self.dies_after: List[List[Node]] = []
        self._attrs: Dict[Node, object] = {}
        # δθ per parameter name; None: δθ = θ on every δθ parameter (option
        # perturb="weights"), which the fast layer identities of :mod:`.oba` rely on.
        self.delta: Optional[Dict[str, Tensor]] = None

    def attr(self, node: Node):
        """The value a ``get_attr`` node fetches."""
        return self._attrs[node]

    def delta_of(self, param) -> Optional[Tensor]:
        """δθ of the parameter tensor ``param``: ``param`` itself when δθ = θ, the
        given direction otherwise (None when it has none)."""
        if not isinstance(param, Tensor):
            return None
        if self.delta is None:
            name = self.canon.get(id(param))
            return param.detach() if name in self.dtheta else None
        return self.delta.get(self.canon.get(id(param)))

    def add(self, param: Tensor) -> Optional[str]:
        """Put ``param`` into δθ; returns its canonical name (None if not a parameter)."""
        name = self.canon.get(id(param))
        if name is not None:
            self.dtheta[name] = param
        return name


def _dependencies(gm: GraphModule, plan: GraphPlan):
    """(nodes depending on a graph input, {other node: parameter names it derives from})."""
    act, pdeps = set(), {}
    for node in gm.graph.nodes:
        ins = node.all_input_nodes
        if node.op == "placeholder" or any(i in act for i in ins):
            act.add(node)
        elif node.op == "get_attr":
            value = plan._attrs[node]
            name = plan.canon.get(id(value)) if isinstance(value, nn.Parameter) else None
            pdeps[node] = frozenset([name] if name else [])
        else:
            pdeps[node] = frozenset().union(*(pdeps.get(i, frozenset()) for i in ins))
    return act, pdeps


def _standard_forward(mod: nn.Module) -> bool:
    """True when a Conv/Linear (sub)class keeps torch's ``Y = F(X; W) + b`` forward; a
    leaf subclass with its own forward is opaque to OBA."""
    return any(type(mod).forward is cls.forward for cls in
               (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                nn.ConvTranspose2d, nn.ConvTranspose3d))


def _find_layers(gm: GraphModule, plan: GraphPlan, act, pdeps) -> None:
    """Fill ``plan.layers``, ``plan.bilinear`` and ``plan.dtheta``."""
    module_params = {plan.canon[id(p)] for m in gm.modules() if isinstance(m, LAYER_MODULES)
                     for p in m.parameters(recurse=False)}
    opaque = []
    for node, ex in plan.execs.items():
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, LAYER_MODULES) and _standard_forward(mod):
                for p in mod.parameters(recurse=False):
                    plan.add(p)
                plan.layers[node] = Layer(0, None, None, True, mod, plan.add(mod.weight))
            elif any(isinstance(m, LAYER_MODULES) for m in mod.modules()):  # opaque leaf
                opaque.append(node.target)
            continue
        slots = _operands(node, ex)
        if slots is None:
            continue
        ops = [ex.nargs[s] for s in slots]
        if not all(isinstance(o, Node) for o in ops):
            continue
        is_act = [o in act for o in ops]
        if all(is_act):
            plan.bilinear[node] = slots
            continue
        if not any(is_act):
            continue
        xs, ws = (slots[0], slots[1]) if is_act[0] else (slots[1], slots[0])
        params = pdeps.get(ex.nargs[ws], frozenset())
        if not params or (_is_mul(node, ex) and not params & module_params):
            continue                                  # LayerScale-style: a linear op
        b = 2 if ex.fn in LAYER_FUNCTIONS and len(ex.nargs) > 2 else None
        bnode = ex.nargs[b] if b is not None else None
        bparams = pdeps.get(bnode, frozenset()) if isinstance(bnode, Node) else frozenset()
        for name in params | bparams:
            plan.dtheta[name] = gm.get_parameter(name)
        direct = ex.nargs[ws].op == "get_attr" and (bnode is None or (
            isinstance(bnode, Node) and bnode.op == "get_attr"))
        weight = plan.canon.get(id(plan._attrs.get(ex.nargs[ws])))
        plan.layers[node] = Layer(xs, ws, b, direct, None, weight)
        plan.bilinear[node] = [ws, xs]
    if opaque:
        log.warning("OBA: leaf module(s) %s contain Conv/Linear layers the graph cannot see "
                    "into; their parameters score 0 -- trace through them", opaque)
    _find_biases(gm, plan, pdeps)


def _find_biases(gm: GraphModule, plan: GraphPlan, pdeps) -> None:
    """A parameter added right after a functional matmul layer is that layer's bias."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (operator.add, torch.add):
            continue
        a = [x for x in node.args[:2] if isinstance(x, Node)]
        if len(a) == 2 and any(x in plan.layers and plan.layers[x].module is None
                               for x in a):
            for x in a:
                if x.op == "get_attr" and pdeps.get(x):
                    for name in pdeps[x]:
                        plan.dtheta[name] = gm.get_parameter(name)


def build_plan(gm: nn.Module) -> GraphPlan:
    """Analyse ``gm`` (see the module docstring). A plain ``nn.Module`` (no graph) gets
    only δθ, from its Conv/Linear modules -- enough for OBA-exact."""
    plan = GraphPlan(gm)
    if not isinstance(gm, GraphModule):
        for m in gm.modules():
            if isinstance(m, LAYER_MODULES):
                for p in m.parameters(recurse=False):
                    plan.add(p)
        return plan
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op == "get_attr":
            plan._attrs[node] = fetch_attr(gm, node.target)
        elif node.op in ("call_module", "call_function", "call_method"):
            plan.execs[node] = resolve(gm, node)
    act, pdeps = _dependencies(gm, plan)
    _find_layers(gm, plan, act, pdeps)
    dnames = set(plan.dtheta)
    for node in nodes:
        if (node.op == "get_attr" and plan.canon.get(id(plan._attrs[node])) in dnames) or \
                (node in plan.layers and plan.layers[node].module is not None) or \
                any(i in plan.has_tangent for i in node.all_input_nodes):
            plan.has_tangent.add(node)
    for node, ex in plan.execs.items():
        rule = oba_tangents.tangent_rule(gm, node, ex, _operands(node, ex))
        if rule is not None and node in plan.has_tangent:
            plan.rules[node] = rule
    pos = {n: i for i, n in enumerate(nodes)}
    plan.dies_after = [[] for _ in nodes]
    for node in nodes:
        last = max((pos[u] for u in node.users), default=pos[node])
        plan.dies_after[last].append(node)
    return plan


@contextlib.contextmanager
def scoring_state(model: nn.Module, params: Iterable[Tensor]):
    """Put ``model`` in eval mode and make ``params`` require grad for the duration;
    every module's ``training`` flag and every ``requires_grad`` flag are restored."""
    params = list(params)
    flags = [(p, p.requires_grad) for p in params]
    try:
        with eval_mode(model):
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
