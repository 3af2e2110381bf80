"""``fxprune groups``: the coupled-channel groups of a model, as a table and a graph.

The group graph has one node per group and an edge A -> B for every parameter layer
that consumes the channels of group A (its input columns are members of A) and
produces the channels of group B (its output rows are members of B); the edge is
labelled with the layer. Formats, by the ``--graph`` file name:

- ``.dot``: Graphviz DOT text (always available);
- ``.svg`` / ``.html``: the picture of :mod:`fxprune.graph_view`, laid out by layer
  order (rows: layers in graph order; bands: groups); the HTML is self-contained.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Dict, List, Tuple

from .common import (CliError, check_output, load_model, log, public_mode, resolve_device,
                         resolve_input_size)
from ..graph_view import to_html, to_svg
from ..group import Group, groups_table
from ..plan import write_atomic

GRAPH_SUFFIXES = (".dot", ".gv", ".svg", ".html", ".htm")
Edges = Dict[Tuple[str, str], List[str]]


def run_groups(args) -> int:
    """Entry point of ``fxprune groups`` (see ``fxprune groups --help``)."""
    import torch
    from .. import connectivity, groups
    check_output(args.graph, "--graph", GRAPH_SUFFIXES)
    check_output(args.json, "--json", (".json",))
    device = resolve_device(args.device)
    model = load_model(args.model, args.checkpoint, args.num_classes, device, args.input_size,
                       allow_pickle=args.allow_pickle)
    size = resolve_input_size(args.model, model, args.input_size)
    example = torch.zeros(1, *size, device=device)
    log.info("analysing: tracing the model on an input of shape %s", list(example.shape))
    found = groups(model, example)
    print(groups_table(found))
    if args.verbose:
        for g in found:
            print()
            print(g)
    prunable = sum(g.prunable for g in found)
    print(f"\n{len(found)} groups: {prunable} prunable, {len(found) - prunable} fixed")
    conn = connectivity(model, example)
    print(conn.table())
    if args.json:
        write_atomic(args.json, json.dumps([g.to_dict() for g in found], indent=1) + "\n")
        public_mode(args.json)
        log.info("wrote %s", args.json)
    if args.graph:
        write_graph(found, args.graph, title=f"{args.model} {list(example.shape)}",
                    order=conn.layers, within=conn.within)
        public_mode(args.graph)
        log.info("wrote %s", args.graph)
    return 0


def group_edges(found: List[Group]) -> Edges:
    """``{(group A, group B): [layers]}`` for layers that map A's channels into B's."""
    produced: Dict[str, List[str]] = defaultdict(list)   # layer -> groups it produces
    consumed: Dict[str, List[str]] = defaultdict(list)   # layer -> groups it consumes
    for g in found:
        for m in g.members:
            layer = m.target.rsplit(".", 1)[0]
            if m.role == "producer":
                produced[layer].append(g.id)
            elif m.role == "consumer":
                consumed[layer].append(g.id)
    edges: Edges = defaultdict(list)
    for layer, sources in consumed.items():
        for a in dict.fromkeys(sources):
            for b in dict.fromkeys(produced.get(layer, [])):
                if a != b and layer not in edges[(a, b)]:
                    edges[(a, b)].append(layer)
    return dict(edges)


def write_graph(found: List[Group], path: str, title: str = "groups", order=None,
                within=()) -> None:
    """Write the group graph as DOT, SVG or HTML, by ``path``'s suffix; ``order``: the
    parameter layers in graph order (``Connectivity.layers``), ``within``: layers with a
    product inside them (``Connectivity.within``)."""
    lower = path.lower()
    if lower.endswith((".dot", ".gv")):
        write_atomic(path, to_dot(found, title))
    elif lower.endswith(".svg"):
        write_atomic(path, to_svg(found, order, title, within))
    elif lower.endswith((".html", ".htm")):
        write_atomic(path, to_html(found, order, title, within))
    else:
        raise CliError(f"--graph {path}: use a .dot, .svg or .html file name")


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(found: List[Group], title: str = "groups") -> str:
    """Graphviz DOT text: prunable groups blue, fixed groups grey with their reason."""
    lines = [f"digraph {_q('fxprune groups')} {{", f"  label={_q(title)};", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8];']
    for g in found:
        label = f"{g.id}\n{g.size} {g.kind}" + (f" /{g.divisor}" if g.divisor > 1 else "")
        if not g.prunable:
            label += f"\nfixed: {g.reason}"
        color = "lightblue" if g.prunable else "lightgrey"
        tip = ", ".join(dict.fromkeys(m.target for m in g.members))
        lines.append(f"  {_q(g.id)} [label={_q(label)}, fillcolor={color}, tooltip={_q(tip)}];")
    for (a, b), layers in sorted(group_edges(found).items()):
        shown = ", ".join(layers[:3]) + (f" +{len(layers) - 3}" if len(layers) > 3 else "")
        lines.append(f"  {_q(a)} -> {_q(b)} [label={_q(shown)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
