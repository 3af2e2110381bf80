"""``fxprune groups``: the coupled-channel groups of a model, as a table and a graph.

The group graph has one node per group and an edge A -> B for every parameter layer
that consumes the channels of group A (its input columns are members of A) and
produces the channels of group B (its output rows are members of B); the edge is
labelled with the layer. Formats, by the ``--graph`` file name:

- ``.dot``: Graphviz DOT text (always available);
- ``.svg``: rendered by Graphviz's ``dot`` when it is installed;
- ``.html``: a self-contained page (no network) listing every group with its members
  and its neighbouring groups, in collapsible sections.
"""
from __future__ import annotations

import html
import json
import shutil
import subprocess
from collections import defaultdict
from typing import Dict, List, Tuple

from .common import (CliError, check_output, load_model, log, public_mode, resolve_device,
                         resolve_input_size)
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
    if args.graph and args.graph.lower().endswith(".svg") and shutil.which("dot") is None:
        raise CliError(f"--graph {args.graph}: SVG output needs Graphviz's `dot` "
                       "(apt-get install graphviz); write a .dot or .html graph instead")
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
    print(connectivity(model, example).table())
    if args.json:
        write_atomic(args.json, json.dumps([g.to_dict() for g in found], indent=1) + "\n")
        public_mode(args.json)
        log.info("wrote %s", args.json)
    if args.graph:
        write_graph(found, args.graph, title=f"{args.model} {list(example.shape)}")
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


def write_graph(found: List[Group], path: str, title: str = "groups") -> None:
    """Write the group graph as DOT, SVG (via ``dot``) or HTML, by ``path``'s suffix."""
    lower = path.lower()
    if lower.endswith((".dot", ".gv")):
        write_atomic(path, to_dot(found, title))
    elif lower.endswith(".svg"):
        write_atomic(path, render_svg(to_dot(found, title)))
    elif lower.endswith((".html", ".htm")):
        write_atomic(path, to_html(found, title))
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


def render_svg(dot_text: str) -> bytes:
    """Render DOT text with Graphviz's ``dot -Tsvg``."""
    exe = shutil.which("dot")
    if exe is None:
        raise CliError("SVG output needs Graphviz's `dot` (apt-get install graphviz); "
                       "write a .dot or .html graph instead")
    done = subprocess.run([exe, "-Tsvg"], input=dot_text.encode(), capture_output=True,
                          timeout=300)
    if done.returncode != 0:
        raise CliError(f"dot -Tsvg failed: {done.stderr.decode(errors='replace').strip()[:300]}")
    return done.stdout


_CSS = """body{font-family:sans-serif;margin:2em}details{margin:.3em 0;border:1px solid #ddd;
border-radius:4px;padding:.3em .6em}summary{cursor:pointer}.fixed summary{color:#777}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;text-align:left;
font-family:monospace;font-size:90%}th{border-bottom:1px solid #aaa}.n{color:#555}"""
_JS = ("function setAll(o){document.querySelectorAll('details').forEach("
       "function(d){d.open=o;});}")


def to_html(found: List[Group], title: str = "groups") -> str:
    """A self-contained HTML page with one collapsible section per group."""
    edges = group_edges(found)
    into: Dict[str, List[str]] = defaultdict(list)
    out_of: Dict[str, List[str]] = defaultdict(list)
    for (a, b), layers in edges.items():
        out_of[a].append(f"{b} (via {', '.join(layers)})")
        into[b].append(f"{a} (via {', '.join(layers)})")
    prunable = sum(g.prunable for g in found)
    parts = ["<!DOCTYPE html>\n<html><head><meta charset='utf-8'>",
             f"<title>fxprune groups: {html.escape(title)}</title><style>{_CSS}</style>",
             f"<script>{_JS}</script></head><body>",
             f"<h1>Coupled channel groups of {html.escape(title)}</h1>",
             f"<p>{len(found)} groups: {prunable} prunable, {len(found) - prunable} fixed. "
             "<button onclick='setAll(true)'>expand all</button> "
             "<button onclick='setAll(false)'>collapse all</button></p>"]
    for g in found:
        parts.append(_group_html(g, into.get(g.id, []), out_of.get(g.id, [])))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _group_html(g: Group, into: List[str], out_of: List[str]) -> str:
    """One collapsible ``<details>`` section: members and neighbouring groups."""
    status = "prunable" if g.prunable else f"fixed: {g.reason}"
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(m.target)}</td><td>{m.dim}</td><td>{esc(m.role)}</td>"
                   f"<td>{len(m.index_map[0]) if m.index_map else 0}</td></tr>"
                   for m in g.members)
    links = ""
    if into:
        links += f"<p class='n'>fed by: {esc('; '.join(into))}</p>"
    if out_of:
        links += f"<p class='n'>feeds: {esc('; '.join(out_of))}</p>"
    divisor = f", divisor {g.divisor}" if g.divisor > 1 else ""
    return (f"<details class='{'prunable' if g.prunable else 'fixed'}' id='{esc(g.id)}'>"
            f"<summary><b>{esc(g.id)}</b> &mdash; {g.size} {esc(g.kind)} channels{divisor}, "
            f"{len(g.members)} members, {esc(status)}</summary>{links}"
            "<table><tr><th>target</th><th>dim</th><th>role</th><th>indices/channel</th></tr>"
            f"{rows}</table></details>")
