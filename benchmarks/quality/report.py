"""Markdown table and accuracy-vs-kept-FLOPs plot from the JSON-lines results."""
from __future__ import annotations

import statistics
from collections import OrderedDict
from typing import Dict, List


def _ms(values: List[float], fmt: str = "{:.2f}") -> str:
    """mean ± std (std over seeds; '' for one seed)."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _sort_key(r: Dict):
    """Model, one-shot before iterative, larger budgets first, criteria in a fixed order
    (fxprune's, then Torch-Pruning's)."""
    from .config import CRITERIA
    methods = CRITERIA + ["tp-magnitude", "tp-taylor", "tp-hessian"]
    rank = methods.index(r["criterion"]) if r["criterion"] in methods else len(methods)
    budget = -r["budget"] if r["kind"] != "iterative" else 0
    return (r["model"], r["kind"] == "iterative", budget, rank, r["criterion"])


def method_name(r: Dict) -> str:
    """The row's method: the criterion, with fxprune's repair mode when one ran."""
    return r["criterion"] + (f" + {r['repair']} repair" if r.get("repair") else "")


def _group(records: List[Dict]) -> "OrderedDict[tuple, List[Dict]]":
    rows: "OrderedDict[tuple, List[Dict]]" = OrderedDict()
    for r in sorted(records, key=_sort_key):
        budget = "iter " + "→".join(map(str, r["budget"])) if r["kind"] == "iterative" \
            else str(r["budget"])
        rows.setdefault((r["model"], budget, method_name(r)), []).append(r)
    return rows


def table(records: List[Dict]) -> str:
    """One row per (model, budget, criterion): means ± std over seeds; errors verbatim."""
    head = ("| model | budget (kept FLOPs target) | criterion | kept FLOPs | kept params | "
            "acc before FT (%) | acc after BN recal. (%) | acc after FT (%) | seeds | "
            "prune time (s) |")
    lines = [head, "|" + "---|" * 10]
    for (model, budget, crit), recs in _group(records).items():
        ok = [r for r in recs if "error" not in r]
        if not ok:
            err = recs[0]["error"].replace("|", "\\|")[:300]
            lines.append(f"| {model} | {budget} | {crit} | ERROR: {err} | | | | | {len(recs)} | |")
            continue
        cells = [_ms([r["flops"] for r in ok], "{:.3f}"), _ms([r["params"] for r in ok], "{:.3f}"),
                 _ms([r["acc_before"] for r in ok]),
                 _ms([r["acc_recal"] for r in ok if "acc_recal" in r]),
                 _ms([r["acc_after"] for r in ok]),
                 str(len(ok)), _ms([r["prune_s"] for r in ok], "{:.1f}")]
        lines.append(f"| {model} | {budget} | {crit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(records: List[Dict]) -> str:
    """Per model: one row per method, one column per budget, cells "after FT (after BN
    recalibration)"; the best after-FT mean of each column in bold."""
    out = []
    for model in sorted({r["model"] for r in records}):
        recs = [r for r in records if r["model"] == model and r["kind"] != "iterative"
                and "error" not in r]
        budgets = sorted({r["budget"] for r in recs}, reverse=True)
        methods: "OrderedDict[str, Dict[float, List[Dict]]]" = OrderedDict()
        for r in sorted(recs, key=_sort_key):
            methods.setdefault(method_name(r), {}).setdefault(r["budget"], []).append(r)
        best = {b: max((statistics.mean(x["acc_after"] for x in by[b])
                        for by in methods.values() if b in by), default=None) for b in budgets}
        out += [f"**{model}**: test accuracy (%) after fine-tuning; in parentheses, one-shot "
                "accuracy before fine-tuning with the BN statistics re-estimated (no gradient "
                "step; the plain one-shot accuracy for a model without BN); mean over seeds; "
                "best after-FT mean per column in bold", "",
                "| method | " + " | ".join(f"kept FLOPs {b}" for b in budgets) + " |",
                "|---|" + "---|" * len(budgets)]
        for name, by in methods.items():
            cells = []
            for b in budgets:
                if b not in by:
                    cells.append("-")
                    continue
                after = statistics.mean(x["acc_after"] for x in by[b])
                recal = [x["acc_recal"] for x in by[b] if "acc_recal" in x]
                text = f"{after:.2f}" + (f" ({statistics.mean(recal):.1f})" if recal else "")
                cells.append(f"**{text}**" if after == best[b] else text)
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(records: List[Dict], dense_acc: Dict[str, float], path: str) -> str:
    """Accuracy after FT (solid) and before FT (dashed) vs kept FLOPs, one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(7 * max(1, len(models)), 5),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        series: Dict[str, Dict] = {}
        for r in records:
            if r["model"] != model or "error" in r:
                continue
            name = method_name(r) + (" (iterative)" if r["kind"] == "iterative" else "")
            budget = str(r["budget"])
            series.setdefault(name, {}).setdefault(budget, []).append(r)
        for i, (name, by_budget) in enumerate(sorted(series.items())):
            # one point per budget: the means over seeds, the seeds' range as error bars
            pts = sorted((statistics.mean(r["flops"] for r in rs),
                          [r["acc_after"] for r in rs],
                          statistics.mean(r["acc_before"] for r in rs))
                         for rs in by_budget.values())
            xs = [p[0] for p in pts]
            after = [statistics.mean(p[1]) for p in pts]
            spread = [[a - min(p[1]) for a, p in zip(after, pts)],
                      [max(p[1]) - a for a, p in zip(after, pts)]]
            color = plt.cm.tab20(i % 20)
            ax.errorbar(xs, after, yerr=spread, fmt="o-", color=color, capsize=2, label=name)
            ax.plot(xs, [p[2] for p in pts], "x--", color=color, alpha=0.4)
        if model in dense_acc:
            ax.axhline(dense_acc[model], color="k", lw=0.8, ls=":", label="dense")
        ax.set_xlabel("kept FLOPs (fraction of dense)")
        ax.set_ylabel("test accuracy (%)  — o: after FT, x: before FT")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
