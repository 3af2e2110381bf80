"""Tables and plot of the post-training benchmark (posttrain.py): accuracy per criterion
x repair mode x budget, mean ± std over seeds."""
from __future__ import annotations

import statistics
from collections import OrderedDict
from typing import Dict, List, Optional

from .report import _ms

REPAIRS = ("none", "bn", "full")


def _rows(records: List[Dict]) -> "OrderedDict[tuple, List[Dict]]":
    from .config import CRITERIA
    order = CRITERIA + ["tp-magnitude", "tp-taylor", "tp-hessian"]
    rank = lambda c: order.index(c) if c in order else len(order)
    out: "OrderedDict[tuple, List[Dict]]" = OrderedDict()
    for r in sorted(records, key=lambda r: (r["model"], -r["budget"], rank(r["criterion"]))):
        out.setdefault((r["model"], r["budget"], r["criterion"]), []).append(r)
    return out


def _mean(recs: List[Dict], key: str) -> Optional[float]:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def posttrain_table(records: List[Dict]) -> str:
    lines = ["| model | budget | criterion | kept FLOPs | acc, no repair (%) | acc, BN re-est. (%) "
             "| acc, full repair (%) | seeds | prune s | full repair s |", "|" + "---|" * 10]
    for (model, budget, crit), recs in _rows(records).items():
        ok = [r for r in recs if "error" not in r]
        if not ok:
            err = recs[0]["error"].replace("|", "\\|")[:200]
            lines.append(f"| {model} | {budget} | {crit} | ERROR: {err} | | | | {len(recs)} | | |")
            continue
        accs = [_ms([r[f"acc_{m}"] for r in ok if f"acc_{m}" in r]) for m in REPAIRS]
        lines.append(f"| {model} | {budget} | {crit} | {_ms([r['flops'] for r in ok], '{:.3f}')} | "
                     + " | ".join(accs) + f" | {len(ok)} | {_ms([r['prune_s'] for r in ok], '{:.1f}')} "
                     f"| {_ms([r['repair_full_s'] for r in ok if 'repair_full_s' in r], '{:.1f}')} |")
    return "\n".join(lines)


def posttrain_summary(records: List[Dict]) -> str:
    """Per model: methods x budgets, cells "none / bn / full" (means); the best cell of
    each budget in bold."""
    groups = _rows(records)
    out = []
    for model in sorted({k[0] for k in groups}):
        budgets = sorted({k[1] for k in groups if k[0] == model}, reverse=True)
        methods = list(OrderedDict.fromkeys(k[2] for k in groups if k[0] == model))
        best = {}
        for b in budgets:
            vals = [_mean(groups.get((model, b, m), []), f"acc_{rep}") for m in methods for rep in REPAIRS]
            vals = [v for v in vals if v is not None]
            best[b] = max(vals) if vals else None
        out += [f"### {model}: test accuracy (%) without fine-tuning — no repair / BN "
                "re-estimated / full repair", "",
                "| method | " + " | ".join(f"kept FLOPs {b}" for b in budgets) + " |",
                "|---|" + "---|" * len(budgets)]
        for m in methods:
            cells = []
            for b in budgets:
                tried = groups.get((model, b, m), [])
                recs = [r for r in tried if "error" not in r]
                parts = []
                for rep in REPAIRS:
                    v = _mean(recs, f"acc_{rep}")
                    text = "–" if v is None else f"{v:.2f}"
                    parts.append(f"**{text}**" if v is not None and v == best[b] else text)
                cells.append(" / ".join(parts) if recs else "error" if tried else "not run")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _series(groups, model: str, method: str, rep: str):
    """(kept FLOPs, mean accuracy) points of one method and repair mode, sorted."""
    pts = []
    for (mm, _b, crit), recs in groups.items():
        ok = [r for r in recs if "error" not in r]
        v = _mean(ok, f"acc_{rep}")
        if mm == model and crit == method and v is not None:
            pts.append((_mean(ok, "flops"), v))
    return sorted(pts)


_REPAIR_TITLE = {"none": "no repair", "bn": "BN statistics re-estimated",
                 "full": "full repair (BN + least squares)"}


def plot_posttrain(records: List[Dict], dense: Dict[str, float], path: str) -> str:
    """Accuracy vs kept FLOPs: one panel per model (rows) and repair mode (columns),
    colour = method (one legend below, Torch-Pruning dashed), the dense model grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = _rows(records)
    models = sorted({k[0] for k in groups})
    methods = list(OrderedDict.fromkeys(k[2] for k in groups))
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(models), len(REPAIRS), figsize=(15, 4.2 * len(models) + 1.1),
                             squeeze=False)
    for row, model in zip(axes, models):
        for ax, rep in zip(row, REPAIRS):
            for m in methods:
                pts = _series(groups, model, m, rep)
                if pts:
                    ax.plot(*zip(*pts), "--" if m.startswith("tp-") else "-", marker="o",
                            ms=3, lw=2.4 if m == "obs" else 1.2, color=colours[m], label=m)
            if model in dense:
                ax.axhline(dense[model], color="grey", lw=0.8)
            ax.set_title(f"{model}: {_REPAIR_TITLE[rep]}", fontsize=11)
            ax.set_xlabel("kept FLOPs (fraction of dense)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
    by_label = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(lab, h)
    fig.legend(list(by_label.values()), list(by_label), loc="lower center", fontsize=10,
               ncol=min(8, len(by_label)), frameon=False)
    fig.suptitle("Post-training pruning, no fine-tuning (grey: dense model; "
                 "Torch-Pruning dashed)", fontsize=12)
    fig.tight_layout(rect=(0, 0.8 / (4.2 * len(models) + 1.1), 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
