"""Lockstep sweep: the dense and the slim graph run node by node over all calibration
batches together (the engine of the repair pass, design §7b).

Contract: reads two GraphModules with the same nodes in the same order (the slim one
is the rewrite of the dense one) and a list of input tuples, one per batch. For every
node it computes the dense values, then calls the node's hook (if any: it may change
the slim model's tensors, e.g. re-fit the layer about to run), then the slim values.
``env_dense[node]`` / ``env_slim[node]`` hold one value per batch for every live node;
a value is freed after its last use in *both* graphs (the rewrite replaces some uses by
literals, so the dense graph can need a value longer). Memory is the live frontier's
activations for all batches, not all activations. Never changes the dense model.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.fx

from ..errors import FxpruneError
from .groups import fetch_attr

__all__ = ["LockstepSweep"]

Hook = Callable[[torch.fx.Node, torch.fx.Node], None]


class LockstepSweep:
    """Runs ``dense`` and ``slim`` side by side over ``inputs`` (see the module doc)."""

    def __init__(self, dense: torch.fx.GraphModule, slim: torch.fx.GraphModule,
                 inputs: Sequence[Tuple[Any, ...]]):
        self.dense, self.slim, self.inputs = dense, slim, inputs
        self.mods = {id(dense): dict(dense.named_modules()), id(slim): dict(slim.named_modules())}
        # placeholder node -> position among the inputs (same names in both graphs)
        self.input_index = {n.name: k for k, n in enumerate(
            n for n in dense.graph.nodes if n.op == "placeholder")}
        self.env_dense: Dict[torch.fx.Node, list] = {}
        self.env_slim: Dict[torch.fx.Node, list] = {}

    def run(self, hooks: Dict[str, Hook]) -> Tuple[list, list]:
        """Sweep the graphs, calling ``hooks[node name](slim node, dense node)`` before
        the slim values of that node; returns the per-batch (dense, slim) outputs."""
        d_nodes, s_nodes = list(self.dense.graph.nodes), list(self.slim.graph.nodes)
        if [n.name for n in d_nodes] != [n.name for n in s_nodes]:
            raise FxpruneError("repair: the slim graph's nodes do not match the dense graph's "
                               "(internal error; please report this model)")
        frees = _last_uses(d_nodes, s_nodes)
        out_d = out_s = None
        for i, (nd, ns) in enumerate(zip(d_nodes, s_nodes)):
            self.env_dense[nd] = self._values(self.dense, nd, self.env_dense)
            hook = hooks.get(ns.name)
            if hook is not None:
                hook(ns, nd)
            self.env_slim[ns] = self._values(self.slim, ns, self.env_slim)
            if ns.op == "output":
                out_d, out_s = self.env_dense[nd], self.env_slim[ns]
            for k in frees.get(i, ()):
                self.env_dense.pop(d_nodes[k], None)
                self.env_slim.pop(s_nodes[k], None)
        return out_d, out_s

    def slim_value(self, node: torch.fx.Node, b: int):
        """Run one slim node again on batch ``b`` (its inputs must still be live)."""
        return self._run(self.slim, node, self.env_slim, b)

    def _values(self, gm, node, env) -> list:
        if node.op == "get_attr":
            return [fetch_attr(gm, node.target)] * len(self.inputs)
        return [self._run(gm, node, env, b) for b in range(len(self.inputs))]

    def _run(self, gm, node: torch.fx.Node, env, b: int):
        batch = self.inputs[b]
        if node.op == "placeholder":
            k = self.input_index[node.name]
            if k < len(batch):
                return batch[k]
            if node.args:
                return node.args[0]  # the forward's default value
            raise FxpruneError(f"repair: calibration batches give {len(batch)} inputs, the "
                               f"model needs `{node.target}` too")
        args = torch.fx.node.map_arg(node.args, lambda n: env[n][b])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n][b])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.mods[id(gm)][node.target](*args, **kwargs)
        if node.op == "output":
            return args[0]
        raise FxpruneError(f"repair: unexpected node kind {node.op!r} ({node.name})")


def _last_uses(*graphs: List[torch.fx.Node]) -> Dict[int, List[int]]:
    """Step index -> indices of the nodes whose value is dead after that step in every
    one of ``graphs`` (node lists of equal length, in the same order)."""
    nodes = graphs[0]
    last = {i: i for i in range(len(nodes))}
    for graph in graphs:
        index = {n: i for i, n in enumerate(graph)}
        for n in graph:
            for user in n.users:
                last[index[n]] = max(last[index[n]], index[user])
    out: Dict[int, List[int]] = {}
    for k, step in last.items():
        if nodes[k].op != "output":
            out.setdefault(step, []).append(k)
    return out
