"""Which criterion wins where: issue 12's moonshot table from the committed result rows.

``python -m benchmarks.quality.winners`` reads the fine-tuning rows
(``results/full-<hash>.jsonl``, fxprune with ``repair="full"`` before fine-tuning) and the
post-training rows (``results/posttrain-full-<hash>.jsonl``) and writes
``results-winners.md``: per model, kept-FLOPs budget and stage (post-training /
fine-tuned), the best method of three families side by side, and whether the moonshot's
condition holds there.

Families (by the method's base criterion, before ``+`` options and ``@N`` steps):

* **second-order, removal-aware** (the moonshot's candidates): ``obs`` in every variant,
  and OBA / OBA-exact / SOSP-H / SOSP-I with ``perturb="consumer"`` (``+consumer``);
* **papers' OBA / SOSP**: the same four criteria as published (``perturb="weights"``);
* **other**: every other fxprune criterion (l2, obd, taylor, random, ...) and every
  Torch-Pruning importance.

A stage's accuracy: post-training, fxprune's rows after full repair (the default with
data) and Torch-Pruning's best of "as pruned" and "BN re-estimated" (it has no
least-squares repair); fine-tuned, the accuracy after the shared 200-step recipe. A
method needs 2 seeds to take part, so every cell has a spread. **Clear** means the
removal-aware family's best leads the best of the two other families by more than the
sum of the two standard deviations (the mean ± std intervals do not touch): our reading
of "by more than the seed spread". The best of a family is the best of its variants at
that point, which favours the family with more variants tried; the column "default"
shows what ``compile``'s default with data gave there: one-shot ``obs`` ranked by score ÷
group mean (:data:`DEFAULT_METHOD`), full repair.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
from typing import Dict, Iterable, List, Optional, Tuple

from .run import HERE, RESULTS

__all__ = ["DEFAULT_METHOD", "family", "stage_accuracies", "best_cells", "winners_table",
           "matrix_table", "main"]

PAPERS = ("oba", "oba-exact", "sosp-h", "sosp-i")
#: The benchmark method that is compile's default with data (fxprune/ranking.py).
DEFAULT_METHOD = "obs"
FAMILIES = ("removal-aware", "papers", "other")
Cell = Tuple[str, float, float, int]   # method, mean, std, seeds


def family(method: str) -> str:
    """The family of a benchmark method name such as ``obs+fisher@50`` or ``tp-magnitude``."""
    base, *options = method.split("@")[0].split("+")
    if base == "obs" or (base in PAPERS and "consumer" in options):
        return "removal-aware"
    return "papers" if base in PAPERS else "other"


def stage_accuracies(rows: Iterable[Dict], stage: str) -> Dict[Tuple[str, float, str], List[float]]:
    """``{(model, budget, method): [accuracy per seed]}`` of one stage."""
    out: Dict[Tuple[str, float, str], Dict[int, float]] = {}
    for r in rows:
        if "error" in r or r.get("kind") not in ("oneshot", "posttrain"):
            continue
        tp = r["criterion"].startswith("tp-")
        if stage == "fine-tuned":
            if not tp and r.get("repair") != "full":
                continue
            acc = r["acc_after"]
        else:
            acc = max(r["acc_none"], r.get("acc_bn", r["acc_none"])) if tp else r.get("acc_full")
        if acc is not None:
            out.setdefault((r["model"], r["budget"], r["criterion"]), {})[r["seed"]] = acc
    return {k: [v[s] for s in sorted(v)] for k, v in out.items()}


def best_cells(accs: Dict[Tuple[str, float, str], List[float]], model: str, budget: float
               ) -> Dict[str, Optional[Cell]]:
    """The best method (by mean over its seeds, ≥ 2 seeds) of each family at one point."""
    best: Dict[str, Optional[Cell]] = {f: None for f in FAMILIES}
    for (m, b, method), values in accs.items():
        if m != model or b != budget or len(values) < 2:
            continue
        cell = (method, statistics.mean(values), statistics.stdev(values), len(values))
        fam = family(method)
        if best[fam] is None or cell[1] > best[fam][1]:
            best[fam] = cell
    return best


def _text(cell: Optional[Cell]) -> str:
    return "–" if cell is None else f"{cell[0]} {cell[1]:.2f} ± {cell[2]:.2f} ({cell[3]})"


def _verdict(ours: Optional[Cell], rivals: List[Optional[Cell]]) -> Tuple[str, str]:
    """(lead over the best rival, "clear" / "inside the spread" / "behind")."""
    rivals = [c for c in rivals if c is not None]
    if ours is None or not rivals:
        return "–", "not run"
    rival = max(rivals, key=lambda c: c[1])
    lead = ours[1] - rival[1]
    if lead <= 0:
        return f"{lead:+.2f} vs {rival[0]}", "behind"
    clear = lead > ours[2] + rival[2]
    return f"{lead:+.2f} vs {rival[0]}", "**clear**" if clear else "inside the spread"


def winners_table(stages: Dict[str, List[Dict]]) -> str:
    """Markdown: one row per (model, budget, stage), best cell of each family, verdict."""
    lines = [f"| model | kept FLOPs | stage | default ({DEFAULT_METHOD}) | best removal-aware 2nd-order "
             "| best papers' OBA/SOSP | best other (fxprune or Torch-Pruning) | lead | moonshot |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stage, rows in stages.items():
        accs = stage_accuracies(rows, stage)
        points = sorted({(k[0], k[1]) for k in accs}, key=lambda p: (p[0], -p[1]))
        for model, budget in points:
            best = best_cells(accs, model, budget)
            lead, verdict = _verdict(best["removal-aware"], [best["papers"], best["other"]])
            default = accs.get((model, budget, DEFAULT_METHOD), [])
            default_text = (f"{statistics.mean(default):.2f}" + (
                f" ± {statistics.stdev(default):.2f}" if len(default) > 1 else "")
                + f" ({len(default)})") if default else "–"
            lines.append(f"| {model} | {budget} | {stage} | {default_text} | "
                         f"{_text(best['removal-aware'])} | "
                         f"{_text(best['papers'])} | {_text(best['other'])} | {lead} | {verdict} |")
    return "\n".join(lines)


#: Issue 12's item-4 matrix: every criterion as published, the consumer cut of the papers'
#: four, and Torch-Pruning's importances (which have no gradual mode).
MATRIX_METHODS = ("l2", "taylor", "obd", "random", "obs") + PAPERS + tuple(
    f"{c}+consumer" for c in PAPERS) + ("tp-magnitude", "tp-taylor", "tp-hessian")
MATRIX_BUDGETS = (0.7, 0.5, 0.3, 0.14)
MATRIX_SEEDS = 2


def matrix_table(stages: Dict[str, List[Dict]]) -> str:
    """Markdown: per model and matrix method, how many of the (budget, seed) points of each
    stage x {one-shot, ``@50``} have a row, and (where some are missing) the budgets
    that have both seeds."""
    want = [(b, s) for b in MATRIX_BUDGETS for s in range(MATRIX_SEEDS)]
    accs = {stage: stage_accuracies(rows, stage) for stage, rows in stages.items()}
    models = sorted({k[0] for a in accs.values() for k in a})
    cols = [(stage, steps) for stage in stages for steps in ("", "@50")]
    lines = ["| model | method | " + " | ".join(f"{st} {'steps=50' if n else 'one-shot'}"
                                              for st, n in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for model in models:
        for method in MATRIX_METHODS:
            cells = []
            for stage, steps in cols:
                if steps and not _gradual_applies(method):
                    cells.append("n/a")
                    continue
                seeds = {b: len(accs[stage].get((model, b, method + steps), []))
                         for b in MATRIX_BUDGETS}
                have = sum(min(n, MATRIX_SEEDS) for n in seeds.values())
                done = [str(b) for b in MATRIX_BUDGETS if seeds[b] >= MATRIX_SEEDS]
                partial = 0 < have < len(want)
                cells.append(f"{have}/{len(want)}" + (f" ({', '.join(done) or 'one seed'})"
                                                      if partial else ""))
            lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gradual_applies(method: str) -> bool:
    """Whether ``steps=`` can run the method: not Torch-Pruning's importances, nor a
    criterion that selects by its own greedy (SOSP-I: ``compile`` refuses it)."""
    if method.startswith("tp-"):
        return False
    from fxprune.criteria import get_criterion
    return get_criterion(method.split("+")[0]).select is None


def _load(pattern: str) -> List[Dict]:
    rows: List[Dict] = []
    for path in sorted(glob.glob(os.path.join(RESULTS, pattern))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results-winners.md"))
    args = p.parse_args(argv)
    stages = {"post-training": _load("posttrain-full-*.jsonl"),
              "fine-tuned": _load("full-*.jsonl")}
    text = ("# Which criterion wins where (generated by `python -m benchmarks.quality.winners`)"
            "\n\n" + __doc__.split("\n\n", 1)[1].strip() + "\n\n" + winners_table(stages)
            + "\n\n## What the item-4 matrix holds\n\n(budget, seed) points with a row, of "
            f"{len(MATRIX_BUDGETS)} budgets x {MATRIX_SEEDS} seeds; fine-tuned fxprune rows are "
            "those with full repair before fine-tuning (the benchmark's setting), post-training "
            "rows hold all three repair modes; in brackets, the budgets with both seeds where "
            "some are missing; n/a: `steps=` does not apply (Torch-Pruning, and SOSP-I, which "
            "selects by its own greedy: compile refuses it).\n\n" + matrix_table(stages) + "\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
