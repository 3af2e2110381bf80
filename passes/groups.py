"""Analysis pass: coupled-channel groups of an FX graph (design §3).

Contract: reads a GraphModule whose nodes carry ``tensor_meta`` (see :mod:`.trace`);
writes ``node.meta["fxprune_label"]`` (the channel label of each node's output) and
returns an :class:`Analysis` holding the groups. It never changes the graph or any
tensor. Invariant: zeroing every member slice of a group's channel removes that
channel's effect on the output; ops without a rule make the channels they touch
unprunable (fail closed) with the op named in the group's ``reason``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from ..group import Group, Member
from . import (aten_rules, einsum_rules, index_rules, layer_rules,  # noqa: F401  (register rules)
               recurrent_rules, tensor_rules)
from .labels import LAYER_ROLES, ChannelSpace, components
from .layer_rules import LAYER_MODULES
from .rule_table import RULES, RuleContext, canonical, unknown_rule, untracked_output
from .ties import refuse_broken_ties
from .trace import gc_paused
from .weight_rules import is_2d_transpose

log = logging.getLogger(__name__)
LABEL_KEY = "fxprune_label"
_KIND_RANK = {"channel": 0, "stream": 1, "conv-group": 2, "head": 3}


@dataclass
class Analysis:
    """Groups plus the element-level maps the rewrite pass needs.

    ``element_group[i]``/``element_channel[i]``: group index and channel index of
    atomic id ``i`` (-1 when the id belongs to no reported group)."""

    gm: torch.fx.GraphModule
    space: ChannelSpace
    groups: List[Group]
    element_group: np.ndarray
    element_channel: np.ndarray
    _slots: Optional[Tuple[tuple, np.ndarray, np.ndarray]] = field(
        default=None, init=False, repr=False, compare=False)

    def keep_mask(self, kept: Dict[str, List[int]]) -> np.ndarray:
        """Per atomic id: is it kept under a plan (``{group id: kept channels}``)?

        One gather over the elements: every group's channels own a slice of one flat
        array (plus a trailing always-kept slot for ids in no group), filled from the
        plan, then read through each element's slot (:meth:`_channel_slots`)."""
        starts, slot = self._channel_slots()
        flat = np.ones(int(starts[-1]) + 1, dtype=bool)
        for gi, group in enumerate(self.groups):
            if group.id not in kept:
                continue
            channel_kept = flat[starts[gi]:starts[gi + 1]]  # a view: numpy's index rules
            channel_kept[:] = False
            channel_kept[list(kept[group.id])] = True
        return flat[slot]

    def _channel_slots(self) -> Tuple[np.ndarray, np.ndarray]:
        """(slice starts of each group's channels in the flat array, each element's
        slot in it), computed once per (element maps, group sizes): rebuilt whenever
        a map is replaced or a group changes size (the maps are never edited in place)."""
        sizes = tuple(g.size for g in self.groups)
        cached = self._slots
        if (cached is None or cached[0][0] is not self.element_group
                or cached[0][1] is not self.element_channel or cached[0][2] != sizes):
            starts = np.concatenate([[0], np.cumsum(np.array(sizes, dtype=np.int64))])
            slot = np.where(self.element_group >= 0,
                            starts[np.maximum(self.element_group, 0)] + self.element_channel,
                            starts[-1])
            self._slots = ((self.element_group, self.element_channel, sizes), starts, slot)
        return self._slots[1], self._slots[2]


def label_graph(gm: torch.fx.GraphModule) -> ChannelSpace:
    """Run the channel rules over every node, in graph order."""
    space = ChannelSpace()
    labels: Dict[torch.fx.Node, object] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            label = untracked_output(node)
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            label = (space.param_label(node.target, tuple(value.shape), value)
                     if isinstance(value, torch.Tensor) else None)
        elif node.op == "output":
            ctx = RuleContext(node, space, gm, labels, modules)
            space.block_label(ctx.label(node.args[0]) if not isinstance(node.args[0], dict)
                              else [ctx.label(v) for v in node.args[0].values()],
                              "reaches the model output")
            label = None
        else:
            rule = RULES.lookup(node, gm, modules) or unknown_rule
            label = rule(RuleContext(node, space, gm, labels, modules))
        labels[node] = label
        node.meta[LABEL_KEY] = label
    return space


def fetch_attr(gm: torch.nn.Module, target: str):
    """The attribute at the dotted path ``target`` of ``gm`` (what ``get_attr`` reads)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def analyze(gm: torch.fx.GraphModule) -> Analysis:
    """Label the graph and assemble the groups."""
    with gc_paused():
        return _analyze(gm)


def _analyze(gm: torch.fx.GraphModule) -> Analysis:
    space = label_graph(gm)
    root = components(space.next_id, space.edges_a, space.edges_b)  # channel per element
    while space.rectangular_edges(root):  # rarely: CaiT's talking heads
        root = components(space.next_id, space.edges_a, space.edges_b)
    space.check_same(root)
    group_key = components(space.next_id, *_bridges(space, root))[root]
    analysis = _assemble(gm, space, root, group_key)
    missing = layers_without_group(analysis)
    if missing:
        log.warning("parameter layers whose outputs are in no group (a bug in a channel "
                    "rule; they are not pruned): %s", ", ".join(missing[:8]))
    return refuse_broken_ties(analysis)


_CONV_FUNCTIONS = {F.conv1d: 0, F.conv2d: 0, F.conv3d: 0, F.conv_transpose1d: 1,
                   F.conv_transpose2d: 1, F.conv_transpose3d: 1, F.linear: 0,
                   torch._C._nn.linear: 0}


def layers_without_group(analysis: Analysis) -> List[str]:
    """Conv/Linear layers (modules, or functional calls whose weight is a parameter or
    computed from one) whose output dim is the producer of no group. Every rule gives a
    layer's rows a group, prunable or with a reason, so this is empty."""
    produced = {(m.target, m.dim) for g in analysis.groups for m in g.members
                if m.role == "producer"}
    missing = []
    for node in analysis.gm.graph.nodes:
        found = _layer_weight(analysis.gm, node)
        if found is not None and found not in produced:
            missing.append(node.target if node.op == "call_module" else node.name)
    return missing


def _layer_weight(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """(weight target, output dim) of a parameter layer node, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, LAYER_MODULES) and mod.weight is not None:
            dim = int(getattr(mod, "transposed", False))
            return (f"{node.target}.weight", dim) if mod.weight.shape[dim] > 1 else None
        return None
    target = canonical(node.target) if node.op == "call_function" else None
    if target not in _CONV_FUNCTIONS:
        return None
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    swapped = False  # a transposed 2-D weight (layer_rules follows it): rows are columns
    while isinstance(w, torch.fx.Node) and w.op != "get_attr":
        name = w.target if isinstance(w.target, str) else getattr(w.target, "__name__", "")
        if is_2d_transpose(w):
            swapped = not swapped
        elif name in ("t", "transpose", "permute", "swapaxes", "movedim", "getattr"):
            return None  # another permutation: its rows are another dim
        w = next((a for a in w.args if isinstance(a, torch.fx.Node)), None)
    if not isinstance(w, torch.fx.Node):
        return None
    dim, tensor = _CONV_FUNCTIONS[target], fetch_attr(gm, w.target)
    dim = 1 - dim if swapped else dim
    if not isinstance(tensor, torch.Tensor) or tensor.dim() <= dim or tensor.shape[dim] < 2:
        return None  # one output channel: no channel ids, nothing to group
    return w.target, dim


def _bridges(space: ChannelSpace, root: np.ndarray):
    """Edges between channels that form one group: those a producer (a layer's output
    dim) spans. Only producer dims bridge: a consumer's input dim spans a concat of
    groups. Blocked and free channels of one producer form separate groups, so a layer
    whose outputs are partly fixed (one part of a split reaches the model output) keeps
    the rest prunable: every block names the channels it makes unsound to remove."""
    blocked = np.zeros(space.next_id, dtype=bool)
    for ids, _ in space.blocks:
        blocked[root[ids]] = True
    bridge_a, bridge_b = [], []
    for rec in space.records.values():
        if rec.role == "producer" and rec.ids.size > 1:
            roots = root[rec.ids]
            for part in (roots[blocked[roots]], roots[~blocked[roots]]):
                if part.size > 1:
                    bridge_a.append(np.repeat(part[0], part.size - 1))
                    bridge_b.append(part[1:])
    return bridge_a, bridge_b


def _assemble(gm, space: ChannelSpace, root: np.ndarray, group_key: np.ndarray) -> Analysis:
    producers = {}
    for rec in sorted(space.records.values(), key=lambda r: r.order):
        if rec.role == "producer":
            for key in _distinct(group_key[rec.ids]):
                producers.setdefault(key, rec)
    keys = sorted(producers, key=lambda k: producers[k].order)
    element_group, element_channel, sizes = _element_maps(root, group_key, keys)
    groups: List[Group] = []
    used_ids: Dict[str, int] = {}
    for gi, key in enumerate(keys):
        base = producers[key].target.rsplit(".", 1)[0] if "." in producers[key].target else producers[key].target
        used_ids[base] = used_ids.get(base, 0) + 1
        gid = base if used_ids[base] == 1 else f"{base}#{used_ids[base]}"
        groups.append(Group(id=gid, size=int(sizes[gi])))
    origins = {n.target: n.meta["fxprune_origin"] for n in gm.graph.nodes
               if n.op == "get_attr" and "fxprune_origin" in n.meta}  # (trace.name_constants)
    _add_members(space, groups, element_group, element_channel, origins)
    _mark_status(space, groups, element_group)
    return Analysis(gm, space, groups, element_group, element_channel)


def _element_maps(root: np.ndarray, group_key: np.ndarray, keys: List[int]):
    """Group index and channel index of every element, and the group sizes. Channels of
    a group are numbered in the order of their root ids. Every root is an element of
    its own channel, so only the roots need sorting (by group, stably)."""
    n = len(root)
    key_to_group = np.full(n, -1, dtype=np.int64)
    key_to_group[np.asarray(keys, dtype=np.int64)] = np.arange(len(keys))
    element_group = key_to_group[group_key]
    roots = np.nonzero((root == np.arange(n)) & (element_group >= 0))[0]
    root_group = element_group[roots]
    order = np.argsort(root_group, kind="stable")
    sizes = np.bincount(root_group, minlength=len(keys))
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    channel_of_root = np.full(n, -1, dtype=np.int64)
    channel_of_root[roots[order]] = np.arange(roots.size) - first[root_group[order]]
    element_channel = np.where(element_group >= 0, channel_of_root[root], -1)
    return element_group, element_channel, sizes


def _distinct(values: np.ndarray) -> List[int]:
    """Sorted distinct values (most arrays here hold a single one: skip the sort)."""
    if values.size and (values == values[0]).all():
        return [int(values[0])]
    return np.unique(values).tolist()


def _add_members(space: ChannelSpace, groups: List[Group], element_group, element_channel,
                 origins: Dict[str, str]) -> None:
    """One member per (record, group) it has elements in. Members with equal index maps
    (a conv's rows, its BN entries and the next conv's columns, typically) share one
    list object: the maps are read-only by convention, and building ~10^5 small lists
    per model was the largest cost of the analysis."""
    shared: Dict[tuple, List[List[int]]] = {}
    for rec in sorted(space.records.values(), key=lambda r: r.order):
        gids = element_group[rec.ids]
        for gi in _distinct(gids[gids >= 0]):
            group = groups[gi]
            positions = np.nonzero(gids == gi)[0]
            channels = element_channel[rec.ids[positions]]
            key = (group.size, positions.tobytes(), channels.tobytes())
            if key not in shared:
                shared[key] = _index_map(positions, channels, group.size)
            roles = tuple(r for r in LAYER_ROLES if r in rec.roles) or (rec.role,)
            group.members.append(Member(rec.target, rec.dim, shared[key], rec.role, roles,
                                        origins.get(rec.target)))


def _index_map(positions: np.ndarray, channels: np.ndarray, size: int) -> List[List[int]]:
    """``index_map[c]``: the sorted positions whose channel is ``c`` (vectorised: one
    stable sort, then plain list slicing)."""
    if positions.size == size and np.array_equal(channels, np.arange(size)):
        return [[p] for p in positions.tolist()]  # one index per channel, in order
    order = np.argsort(channels, kind="stable")
    flat = positions[order].tolist()
    ends = np.cumsum(np.bincount(channels, minlength=size)).tolist()
    starts = [0] + ends[:-1]
    return [flat[a:b] for a, b in zip(starts, ends)]


def _mark_status(space: ChannelSpace, groups: List[Group], element_group) -> None:
    for ids, kind in space.kinds:
        for gi in _distinct(element_group[ids]):
            if gi >= 0 and _KIND_RANK[kind] > _KIND_RANK[groups[gi].kind]:
                groups[gi].kind = kind
    for ids, reason in space.blocks:
        for gi in _distinct(element_group[ids]):
            if gi >= 0 and groups[gi].prunable:
                groups[gi].prunable = False
                groups[gi].reason = reason
    for group in groups:
        if group.prunable and group.size < 2:
            group.prunable, group.reason = False, "a single channel cannot be pruned (one is always kept)"
