"""The group graph as a picture laid out by layer order (SVG, and a self-contained HTML page).

Rows are the parameter layers (Conv/Linear) in the topological order of the traced
graph, so the picture reads top to bottom like the network. Every coupled-channel group
is a vertical coloured band from its first to its last member layer, with a mark on each
member row: ● the layer produces the group's channels (output rows), ○ it consumes them
(input columns), ■ both. Bands whose layer spans do not overlap share a column, so the
width stays bounded by the number of groups alive at one depth (a residual stream plus a
few per-block groups), not by the number of groups. The label of a group sits at the top
of its band: id, width, and why it is fixed. Members that are not parameter layers
(norms, biases, tokens) are listed in the band's tooltip and in the HTML table.

The HTML page inlines the SVG, its CSS and a few lines of JS (click a band or a table row
to highlight the group and show its members); it loads nothing from the network.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from .group import Group
from .plot import short_name

__all__ = ["Band", "Layout", "layout", "to_svg", "to_html", "layer_of"]

ROW_H = 20          # px per layer row
COL_W = 18          # px per band column
LABEL_W = 330       # px of the group labels right of the bands
NAME_CHARS = 44     # layer names are middle-truncated beyond this
CHAR_W = 7.2        # px per character of the 12-px monospace font
TOP = 50            # px above the first row: legend and column header
LEGEND = ("● output channels · ○ input channels · ■ both · ⊗ product inside the layer · "
          "dashed grey: fixed group")
# dark enough to read as 12-px text on white and on the row stripes
PALETTE = ["#1f77b4", "#d95f02", "#1b8a5a", "#d62728", "#6a51a3", "#8c564b", "#c2185b",
           "#00838f", "#7a7a00", "#393b79"]
FIXED = "#8a8a8a"


def layer_of(target: str) -> str:
    """The module owning a parameter target (``layer1.0.conv1.weight`` -> ``layer1.0.conv1``)."""
    return target.rsplit(".", 1)[0] if "." in target else target


@dataclass
class Band:
    """One group's band: its column, first/last row, and the role of each member row."""

    group: Group
    col: int
    start: int
    end: int
    marks: Dict[int, str] = field(default_factory=dict)   # row -> producer/consumer/both
    color: str = FIXED
    label_dx: float = 0.0   # labels of bands that start on one row sit side by side


@dataclass
class Layout:
    rows: List[str]
    bands: List[Band]
    elsewhere: List[Group]      # groups with no parameter-layer member
    ncols: int


def _rows(found: Sequence[Group], order: Optional[Sequence[str]]) -> List[str]:
    """Parameter layers in ``order`` (graph order) that own a member of some group; without
    an order, the producer/consumer layers in order of first appearance."""
    used = {layer_of(m.target) for g in found for m in g.members
            if m.role in ("producer", "consumer")}
    if order is not None:
        return [name for name in dict.fromkeys(order) if name in used]
    return list(dict.fromkeys(layer_of(m.target) for g in found for m in g.members
                              if m.role in ("producer", "consumer")))


def layout(found: Sequence[Group], order: Optional[Sequence[str]] = None) -> Layout:
    """Rows, bands and packed columns (greedy interval partitioning by first row)."""
    rows = _rows(found, order)
    row_of = {name: i for i, name in enumerate(rows)}
    bands, elsewhere = [], []
    for g in found:
        marks: Dict[int, str] = {}
        for m in g.members:
            row = row_of.get(layer_of(m.target))
            if row is None or m.role not in ("producer", "consumer"):
                continue
            marks[row] = m.role if marks.get(row, m.role) == m.role else "both"
        if not marks:
            elsewhere.append(g)
            continue
        bands.append(Band(g, 0, min(marks), max(marks), marks))
    column_end: List[int] = []   # last row used by each column
    for i, band in enumerate(sorted(bands, key=lambda b: (b.start, -b.end))):
        free = [c for c, end in enumerate(column_end) if end < band.start]
        band.col = free[0] if free else len(column_end)
        if not free:
            column_end.append(band.end)
        column_end[band.col] = band.end
        band.color = PALETTE[i % len(PALETTE)] if band.group.prunable else FIXED
    offset: Dict[int, float] = {}
    for band in bands:
        band.label_dx = offset.get(band.start, 0.0)
        offset[band.start] = band.label_dx + (len(_label(band.group)) + 2) * CHAR_W
    return Layout(rows, bands, elsewhere, len(column_end))


def _label(g: Group) -> str:
    units = {"head": "heads", "conv-group": "conv groups", "stream": "ch stream"}
    unit = units.get(g.kind, "ch")
    text = f"{short_name(g.id, 40)} · {g.size} {unit}"
    if g.divisor > 1:
        text += f" /{g.divisor}"
    if not g.prunable:
        text += f" · fixed: {g.reason or 'not prunable'}"
    return text if len(text) <= 64 else text[:63] + "…"


def _tooltip(g: Group) -> str:
    status = "prunable" if g.prunable else f"fixed: {g.reason}"
    lines = [f"{g.id}: {g.size} {g.kind} channels, {status}"]
    lines += [f"  {m.role:<8} {m.target} (dim {m.dim})" for m in g.members[:40]]
    if len(g.members) > 40:
        lines.append(f"  … {len(g.members) - 40} more members")
    return "\n".join(lines)


def _geometry(lay: Layout):
    name_w = int(min(NAME_CHARS, max([len(r) for r in lay.rows] + [8])) * CHAR_W) + 24
    band_x = name_w + 10
    label_x = band_x + lay.ncols * COL_W + 12
    longest = max([b.label_dx + len(_label(b.group)) * CHAR_W for b in lay.bands] + [0.0])
    width = int(max(label_x + max(LABEL_W, longest + 16), (len(LEGEND) + 2) * CHAR_W))
    height = TOP + len(lay.rows) * ROW_H + 12
    return name_w, band_x, label_x, width, height


def _mark(x: float, y: float, role: str, color: str) -> str:
    if role == "both":
        return (f"<rect x='{x - 5:.1f}' y='{y - 5:.1f}' width='10' height='10' "
                f"fill='{color}'/>")
    fill = color if role == "producer" else "#ffffff"
    return (f"<circle cx='{x:.1f}' cy='{y:.1f}' r='5' fill='{fill}' stroke='{color}' "
            "stroke-width='2'/>")


def to_svg(found: Sequence[Group], order: Optional[Sequence[str]] = None,
           title: str = "groups", within: Iterable[str] = (), standalone: bool = True) -> str:
    """The group picture as SVG text; ``standalone`` adds the XML namespace a .svg file needs
    (inline in HTML it is not needed). ``within``: layers marked ⊗ (a product inside the
    layer, e.g. a fused qkv's Q·Kᵀ; see :class:`fxprune.Connectivity`)."""
    lay = layout(found, order)
    name_w, band_x, label_x, width, height = _geometry(lay)
    fused = set(within)
    esc = html.escape
    ns = " xmlns='http://www.w3.org/2000/svg'" if standalone else ""
    out = [f"<svg{ns} class='fxgraph' width='{width}' height='{height}' "
           f"viewBox='0 0 {width} {height}' font-family='DejaVu Sans Mono, monospace' "
           "font-size='12'>", f"<title>{esc(title)}</title>",
           f"<rect width='{width}' height='{height}' fill='#ffffff'/>",
           f"<text x='8' y='16' fill='#555555'>{LEGEND}</text>",
           f"<text x='{name_w}' y='40' text-anchor='end' font-weight='bold'>layer</text>",
           f"<text x='{band_x}' y='40' font-weight='bold'>groups</text>"]
    for i, name in enumerate(lay.rows):
        y = TOP + i * ROW_H
        if i % 2 == 0:
            out.append(f"<rect x='0' y='{y}' width='{width}' height='{ROW_H}' fill='#f3f5f8'/>")
        mark = " ⊗" if name in fused else ""
        out.append(f"<text x='{name_w}' y='{y + 14}' text-anchor='end'><title>{esc(name)}"
                   f"{' (a product inside this layer)' if mark else ''}</title>"
                   f"{esc(short_name(name, NAME_CHARS))}{mark}</text>")
    for band in lay.bands:
        out.append(_band_svg(band, band_x, label_x))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _band_svg(band: Band, band_x: int, label_x: int) -> str:
    x = band_x + band.col * COL_W + COL_W / 2
    y0 = TOP + band.start * ROW_H + ROW_H / 2
    y1 = TOP + band.end * ROW_H + ROW_H / 2
    dash = "" if band.group.prunable else " stroke-dasharray='4 3'"
    gid = html.escape(band.group.id, quote=True)
    parts = [f"<g class='band' data-group='{gid}'><title>{html.escape(_tooltip(band.group))}"
             "</title>",
             f"<line x1='{x:.1f}' y1='{y0:.1f}' x2='{x:.1f}' y2='{y1:.1f}' "
             f"stroke='{band.color}' stroke-width='6' stroke-opacity='0.45' "
             f"stroke-linecap='round'{dash}/>"]
    parts += [_mark(x, TOP + row * ROW_H + ROW_H / 2, role, band.color)
              for row, role in sorted(band.marks.items())]
    # leader from the band's top to its label, right of all columns
    parts.append(f"<line x1='{x + 6:.1f}' y1='{y0:.1f}' x2='{label_x - 4}' y2='{y0:.1f}' "
                 f"stroke='{band.color}' stroke-width='1' stroke-opacity='0.5'/>")
    parts.append(f"<text x='{label_x + band.label_dx:.1f}' y='{y0 + 4:.1f}' fill='{band.color}'>"
                 f"{html.escape(_label(band.group))}</text></g>")
    return "".join(parts)


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em}
.fig{overflow:auto;border:1px solid #ddd;max-height:85vh}
.band{cursor:pointer}.dim .band{opacity:.15}.dim .band.on{opacity:1}
table{border-collapse:collapse;margin-top:1em}td,th{padding:2px 10px;text-align:left;
font-size:90%;border-bottom:1px solid #eee}th{border-bottom:1px solid #999}
tr.on{background:#fff3c4}tr[data-group]{cursor:pointer}code{font-size:95%}
#members{white-space:pre;font-family:monospace;font-size:85%;background:#f6f6f6;
padding:.6em;margin:.5em 0}#members:empty{display:none}"""
_JS = """var data=JSON.parse(document.getElementById('fxdata').textContent);
function pick(id){var fig=document.querySelector('svg.fxgraph');var on=fig.classList.toggle(
'dim',id!==null);document.querySelectorAll('.band,tr[data-group]').forEach(function(e){
e.classList.toggle('on',on&&e.getAttribute('data-group')===id);});
document.getElementById('members').textContent=id===null?'':data[id];}
var current=null;document.querySelectorAll('.band,tr[data-group]').forEach(function(e){
e.addEventListener('click',function(){var id=e.getAttribute('data-group');
current=current===id?null:id;pick(current);});});"""


def to_html(found: Sequence[Group], order: Optional[Sequence[str]] = None,
            title: str = "groups", within: Iterable[str] = ()) -> str:
    """A self-contained page: legend, the layer-ordered SVG, and a table of every group."""
    esc = html.escape
    prunable = sum(g.prunable for g in found)
    lay = layout(found, order)
    # "</" would end the script element early: escape it inside the JSON
    data = json.dumps({g.id: _tooltip(g) for g in found}).replace("</", "<\\/")
    rows = "".join(
        f"<tr data-group='{esc(g.id, quote=True)}'><td><code>{esc(g.id)}</code></td>"
        f"<td>{g.size}</td><td>{esc(g.kind)}</td><td>{len(g.members)}</td>"
        f"<td>{'prunable' if g.prunable else esc('fixed: ' + str(g.reason))}</td></tr>"
        for g in found)
    elsewhere = ""
    if lay.elsewhere:
        elsewhere = ("<p>Groups with no Conv/Linear member (not drawn): "
                     + ", ".join(f"<code>{esc(g.id)}</code>" for g in lay.elsewhere) + "</p>")
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>fxprune groups: {esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>Coupled channel groups of {esc(title)}</h1>"
            f"<p>{len(found)} groups ({prunable} prunable, {len(found) - prunable} fixed) over "
            f"{len(lay.rows)} parameter layers, top to bottom in graph order. "
            "Click a band or a table row to highlight a group and list its members.</p>"
            f"<div id='members'></div><div class='fig'>"
            f"{to_svg(found, order, title, within, standalone=False)}</div>{elsewhere}"
            "<table><tr><th>group</th><th>size</th><th>kind</th><th>members</th>"
            f"<th>status</th></tr>{rows}</table>"
            f"<script type='application/json' id='fxdata'>{data}</script>"
            f"<script>{_JS}</script></body></html>\n")
