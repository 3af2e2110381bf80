"""Pictures of a pruning report: per-group keep ratios with bottlenecks flagged."""
from __future__ import annotations

import io
import os

from .plan import write_atomic


def plot_keep_ratios(report, path: str) -> str:
    """Write a bar chart (PNG or SVG, by extension) of each group's keep ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.groups if r.prunable]
    flagged = {r.id for r in report.bottlenecks()}
    width = max(6.0, 0.18 * len(rows) + 2)
    fig, ax = plt.subplots(figsize=(width, 4))
    colors = ["tab:red" if r.id in flagged else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r.keep_ratio for r in rows], color=colors)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.id for r in rows], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept fraction of channels")
    ax.set_title(f"kept FLOPs {report.flops_ratio:.3f}, params {report.params_ratio:.3f} "
                 "(red: bottleneck = pruned far less than the median)")
    fig.tight_layout()
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path
