"""Pictures of a pruning report: per-group keep ratios with bottlenecks flagged.

One horizontal bar per group, in the report's (graph) order, so the chart grows in
height with the number of groups and the group names stay horizontal and legible: a
light bar for the dense width, a coloured bar for the kept fraction (blue: pruned,
red: a bottleneck the criterion refused to prune, grey: a fixed group), and the kept /
dense channel counts printed at the end of each bar.
"""
from __future__ import annotations

import io
import os
from typing import List

from .plan import write_atomic

__all__ = ["plot_keep_ratios", "short_name"]

ROW_INCHES = 0.24       # height of one group's row: 9-pt labels without overlap
MAX_ROWS = 1500         # beyond this a PNG exceeds what viewers open comfortably
NAME_CHARS = 40
COLORS = {"kept": "#3a78b5", "bottleneck": "#d1453b", "fixed": "#9a9a9a", "dense": "#e4e4e4"}


def short_name(name: str, limit: int = NAME_CHARS) -> str:
    """``name`` cut to ``limit`` characters in the middle (``blocks.1…mlp.fc1``), so that
    both the stage prefix and the layer suffix that tell groups apart stay visible."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[len(name) - (limit - 1 - head):]


def _row_color(row, flagged: set) -> str:
    if not row.prunable:
        return COLORS["fixed"]
    return COLORS["bottleneck"] if row.id in flagged else COLORS["kept"]


def _title(report, shown: int, total: int) -> str:
    pruned = sum(1 for r in report.groups if r.prunable)
    line = (f"Kept channels per group: FLOPs kept {report.flops_ratio:.1%}, "
            f"params kept {report.params_ratio:.1%}")
    sub = f"{total} groups ({pruned} prunable, {total - pruned} fixed)"
    if shown < total:
        sub += f"; the first {shown} shown"
    return line + "\n" + sub


def plot_keep_ratios(report, path: str) -> str:
    """Write the keep-ratio chart (PNG or SVG, by ``path``'s extension) and return ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows: List = list(report.groups)[:MAX_ROWS]
    flagged = {r.id for r in report.bottlenecks()}
    height = max(2.6, ROW_INCHES * len(rows) + 1.7)
    fig, ax = plt.subplots(figsize=(9.0, height), layout="constrained")
    ys = list(range(len(rows)))
    ax.barh(ys, [1.0] * len(rows), color=COLORS["dense"], height=0.8, zorder=1)
    ax.barh(ys, [r.keep_ratio for r in rows], color=[_row_color(r, flagged) for r in rows],
            height=0.8, zorder=2)
    for y, r in zip(ys, rows):
        unit = " heads" if r.kind == "head" else ""
        note = f"{r.kept}/{r.size}{unit}" + ("  fixed" if not r.prunable else "")
        ax.text(1.01, y, note, va="center", ha="left", fontsize=8, color="#333333")
    ax.set_yticks(ys)
    ax.set_yticklabels([short_name(r.id) for r in rows], fontsize=9, family="monospace")
    ax.set_ylim(len(rows) - 0.4, -0.6)   # first group on top, no empty margin rows
    ax.set_xlim(0, 1.16)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xticklabels(["0", "25%", "50%", "75%", "100%"], fontsize=9)
    ax.set_xlabel("fraction of the group's channels kept", fontsize=9)
    ax.grid(axis="x", color="white", linewidth=0.8, zorder=3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles = [Patch(color=COLORS["kept"], label="kept"),
               Patch(color=COLORS["bottleneck"], label="kept (bottleneck: pruned far less "
                                                      "than the median)"),
               Patch(color=COLORS["fixed"], label="fixed (not prunable)"),
               Patch(color=COLORS["dense"], label="dense width")]
    fig.legend(handles=handles, loc="outside lower left", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(_title(report, len(rows), len(report.groups)), fontsize=11, x=0.02,
                 ha="left")
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path
