"""Quality benchmark driver: ``python -m benchmarks.quality.run [--quick] ...`` (see README.md).

Trains (or loads cached) dense models, prunes each with every criterion / Torch-Pruning
importance at every kept-FLOPs budget, measures test accuracy before and after a shared
fine-tuning recipe, and writes results-<mode>.md and accuracy-<mode>.png next to this file.
Results are appended to .cache/<mode>-<config hash>.jsonl as they finish; a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace
from typing import Dict

import torch

import fxprune

from . import config as cfg_mod
from .data import calibration_batches, load_split
from .fx_runs import fx_job, iterative_job
from .nets import evaluate, log, trained_model
from .report import plot, summary, table
from .tp_runs import tp_job, tp_names, tp_version

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test (minutes; smoke numbers)")
    p.add_argument("--models", default=None, help="comma list of resnet,vit")
    p.add_argument("--criteria", default=None, help="comma list of fxprune criteria")
    p.add_argument("--seeds", type=int, default=None, help="prune/fine-tune seeds")
    p.add_argument("--budgets", default=None, help="kept-FLOPs targets, e.g. 0.5,0.3,0.14")
    p.add_argument("--train-epochs", type=float, default=None,
                   help="override the dense training length (a reduced run; labelled)")
    p.add_argument("--ft-steps", type=int, default=None, help="override fine-tuning steps")
    p.add_argument("--calib-batches", type=int, default=None,
                   help="override the number of calibration batches (a reduced run)")
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--no-iterative", action="store_true", help="skip the iterative schedule")
    p.add_argument("--report-only", action="store_true",
                   help="write the table/plot from the finished jobs, run nothing new")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return p.parse_args(argv)


def make_config(a: argparse.Namespace):
    c = (cfg_mod.quick if a.quick else cfg_mod.full)(a.train_epochs, a.ft_steps)
    if a.models:
        c.models = a.models.split(",")
    if a.criteria:
        c.criteria = a.criteria.split(",")
    if a.seeds:
        c.seeds = a.seeds
    if a.calib_batches:
        c.calib_batches = a.calib_batches
    if a.budgets:
        c.budgets = [float(b) for b in a.budgets.split(",")]
    return c


class Store:
    """Append-only JSON-lines results keyed by job; lets a rerun resume."""

    def __init__(self, path: str):
        self.path = path
        self.records: Dict[str, Dict] = {}
        if os.path.exists(path):
            for line in open(path):
                if line.strip():
                    r = json.loads(line)
                    self.records[r["key"]] = r

    def run(self, key: str, meta: Dict, fn) -> Dict:
        if key in self.records:
            return self.records[key]
        log(f"job {key}")
        t0 = time.time()
        rec = {**meta, **fn(), "key": key, "wall_s": time.time() - t0}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.records[key] = rec
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                 if k in ("flops", "params", "acc_before", "acc_after", "prune_s", "error")}
        log(f"  done {key}: {shown}")
        return rec


def model_jobs(name: str, c, a, store: Store, train_data, test_data) -> float:
    """All jobs for one model; returns the dense test accuracy."""
    model = trained_model(name, c.train[name], train_data, os.path.join(CACHE, "checkpoints"))
    dense = evaluate(model, *test_data)
    log(f"{name}: dense test accuracy {dense:.2f}% on {len(test_data[0])} images")
    ctx = SimpleNamespace(train_data=train_data, test_data=test_data, ft_recipe=c.ft[name],
                          iter_ft_steps=c.iter_ft_steps, hessian_samples=c.hessian_samples,
                          bisect_iters=c.bisect_iters,
                          calib={s: calibration_batches(*train_data, c.calib_batches,
                                                        c.calib_batch, s) for s in range(c.seeds)})
    tp_models = ["resnet"] if c.mode == "quick" else ["resnet", "vit"]
    for budget in c.budgets:
        for seed in range(c.seeds):
            for crit in c.criteria:
                meta = dict(model=name, budget=budget, criterion=crit, seed=seed, kind="oneshot")
                store.run(f"{name}|{budget}|{crit}|{seed}", meta,
                          lambda: fx_job(model, crit, budget, seed, ctx))
            if a.no_tp or name not in tp_models or (c.mode == "quick" and seed > 0):
                continue
            for imp in tp_names():
                meta = dict(model=name, budget=budget, criterion=imp, seed=seed, kind="oneshot")
                store.run(f"{name}|{budget}|{imp}|{seed}", meta,
                          lambda: tp_job(model, imp, budget, seed, ctx, name == "vit"))
    if name == "resnet" and not a.no_iterative:
        for crit in ("oba", "l2"):
            meta = dict(model=name, budget=c.iterative, kind="iterative", seed=0, criterion=crit)
            store.run(f"{name}|iter{c.iterative}|{crit}|0", meta,
                      lambda: iterative_job(model, crit, c.iterative, 0, ctx))
    return dense


def machine() -> str:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"nproc {os.cpu_count()}, CPU {cpu}, torch {torch.__version__}, torch threads "
            f"{torch.get_num_threads()}, python {platform.python_version()}, torch-pruning "
            f"{tp_version()}, load average at the end {load:.1f}")


def write_outputs(c, a, store: Store, dense: Dict[str, float], wall: float, argv) -> str:
    recs = [r for r in store.records.values() if r["model"] in c.models]
    reduced = (a.train_epochs, a.ft_steps, a.calib_batches) != (None, None, None)
    label = c.mode + ("-reduced" if reduced else "")
    png = plot(recs, dense, os.path.join(HERE, f"accuracy-{label}.png"))
    head = [f"# Quality benchmark — {label} mode" + (" (SMOKE NUMBERS: tiny training, not "
            "meaningful)" if c.mode == "quick" else ""), "",
            f"Command: `python -m benchmarks.quality.run {' '.join(argv)}`", "",
            f"Wall time of this invocation: {wall / 60:.1f} min; sum of the per-job wall times "
            f"(jobs resumed from earlier invocations included, dense training excluded): "
            f"{sum(r.get('wall_s', 0) for r in recs) / 60:.1f} min. Machine: " + machine(), "",
            "Dense test accuracy: " + ", ".join(f"{m} {v:.2f}%" for m, v in dense.items()), "",
            f"Settings: `{json.dumps(asdict(c), default=str)}`", "",
            f"Plot: `{os.path.basename(png)}`. Prune time = wall time of `fxprune.compile` "
            "(trace, scoring, selection, rewrite, verification) or of Torch-Pruning's "
            "statistics + bisection.", ""]
    md = os.path.join(HERE, f"results-{label}.md")
    with open(md, "w") as f:
        f.write("\n".join(head) + summary(recs) + "\nAll rows:\n\n" + table(recs) + "\n")
    return md


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    c = make_config(a)
    os.makedirs(os.path.join(CACHE, "checkpoints"), exist_ok=True)
    start = time.time()
    store = Store(os.path.join(CACHE, f"{c.mode}-{c.tag()}.jsonl"))
    log(f"mode {c.mode}, results -> {store.path}; criteria registered: "
        f"{sorted(fxprune.list_criteria())}")
    train_data, test = load_split("train"), load_split("test")
    test_data = (test[0][:c.test_size], test[1][:c.test_size])
    if a.report_only:
        store.run = lambda key, meta, fn: store.records.get(key)  # finished jobs only
    dense = {m: model_jobs(m, c, a, store, train_data, test_data) for m in c.models}
    md = write_outputs(c, a, store, dense, time.time() - start, argv)
    log(f"wrote {md} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
