"""Post-training quality (no fine-tuning): every criterion x repair mode, beside
Torch-Pruning with BN re-estimation. ``python -m benchmarks.quality.posttrain [--quick]``.

For each model x kept-FLOPs budget x seed x criterion, one job prunes the trained dense
model once (``fxprune.compile(..., repair=None)``), then replays the plan with
``fxprune.apply_plan(..., data=calib, repair="bn" | "full")``, so the three repair rows
share one scoring pass and one plan; test accuracy (the 10 000 test images, which
calibration never saw) is measured for each. Torch-Pruning rows report the plain
pruned model and the one with BN statistics re-estimated on the same calibration
inputs (train-mode cumulative average, the usual recipe). Results are appended to
``results/posttrain-<mode>-<hash>.jsonl`` (committed: a later session resumes instead
of recomputing) and written to ``results-posttrain-<mode>.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

import torch

import fxprune

from . import config as cfg_mod
from .data import load_split
from .jobs import Job, Store, WorkQueue
from .nets import accuracy_after_bn_recalibration, evaluate, log
from .posttrain_report import plot_posttrain, posttrain_summary, posttrain_table
from .run import CACHE, HERE, RESULTS, dense_model, run_jobs
from .tp_runs import tp_names, tp_prune

REPAIRS = ("none", "bn", "full")
BUDGETS = [0.7, 0.5, 0.3]


def fx_posttrain(model, ctx, criterion: str, budget: float, seed: int) -> Dict:
    """One plan, three repair modes, test accuracy of each (no fine-tuning)."""
    criterion, opts = cfg_mod.method_options(criterion, seed)
    if criterion not in fxprune.list_criteria():
        return {"error": f"criterion {criterion!r} is not registered", "skipped": True}
    calib = ctx.calib[seed]
    torch.manual_seed(seed)
    try:
        t0 = time.time()
        res = fxprune.compile(model, criterion, example_inputs=calib[0][0][:2], data=calib,
                              flops=budget, progress=False, repair=None, **opts)
        rec = {"flops": res.report.flops_ratio, "params": res.report.params_ratio,
               "prune_s": time.time() - t0, "acc_none": evaluate(res.module, *ctx.test_data)}
        for mode in REPAIRS[1:]:
            t0 = time.time()
            again = fxprune.apply_plan(model, res.plan, calib[0][0][:2], data=calib,
                                       repair=mode)
            rec[f"repair_{mode}_s"] = time.time() - t0
            rec[f"acc_{mode}"] = evaluate(again.module, *ctx.test_data)
            after = again.report.repair.after
            rec[f"heldout_agreement_{mode}"] = after.agreement if after else None
    except Exception as exc:  # a failing method gets an error row, not a missing one
        log(f"  ERROR {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return rec


def tp_posttrain(model, ctx, method: str, budget: float, seed: int) -> Dict:
    """Torch-Pruning to the same kept-FLOPs target; plain and BN-re-estimated accuracy."""
    out = tp_prune(model, method, budget, seed, ctx, ctx.name == "vit")
    if "error" in out:
        return out
    slim, rec = out.pop("slim"), out
    rec["acc_none"] = evaluate(slim, *ctx.test_data)
    rec["acc_bn"] = accuracy_after_bn_recalibration(slim, ctx.calib[seed], ctx.test_data)
    return rec


def job_list(models: List[str], criteria: List[str], budgets: List[float], seeds: int,
             tp: bool) -> List[Job]:
    jobs = []
    for name in models:
        for budget in budgets:
            for seed in range(seeds):
                methods = list(criteria) + (tp_names() if tp else [])
                for method in methods:
                    fn = tp_posttrain if method in tp_names() else fx_posttrain
                    meta = dict(model=name, budget=budget, criterion=method, seed=seed,
                                kind="posttrain")
                    jobs.append(Job(f"{name}|{budget}|{method}|{seed}", meta, name,
                                    _bind(fn, method, budget, seed)))
    # seed 0 of every budget first, the tightest budgets (the goals) before 0.7: an
    # interrupted run then has one full seed of what matters most
    rank = {b: i for i, b in enumerate(sorted(budgets, key=lambda b: (b > 0.5, -b)))}
    return sorted(jobs, key=lambda j: (j.meta["seed"], rank[j.meta["budget"]]))


def _bind(fn, method, budget, seed):
    return lambda model, ctx: fn(model, ctx, method, budget, seed)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test (smoke numbers)")
    p.add_argument("--models", default="resnet,vit")
    p.add_argument("--criteria", default=",".join(cfg_mod.CRITERIA))
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--no-tp", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    return a


def main(argv=None) -> None:
    import subprocess
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    c = (cfg_mod.quick if a.quick else cfg_mod.full)()
    c.seeds = a.seeds or c.seeds
    models = a.models.split(",")
    os.makedirs(RESULTS, exist_ok=True)
    os.makedirs(CACHE, exist_ok=True)
    store = Store(os.path.join(RESULTS, f"posttrain-{c.mode}-{c.tag()}.jsonl"))
    queue = WorkQueue(os.path.join(CACHE, os.path.basename(store.path) + ".claims"))
    jobs = job_list(models, a.criteria.split(","), [float(b) for b in a.budgets.split(",")],
                    c.seeds, not a.no_tp)
    train_data, test = load_split("train"), load_split("test")
    test_data = (test[0][:c.test_size], test[1][:c.test_size])
    start = time.time()
    if a.worker or (a.workers == 1 and not a.report_only):
        run_jobs(jobs, store, queue if a.worker else None, c, (train_data, test_data))
        if a.worker:
            return
    elif not a.report_only:
        queue.reset()
        base = [sys.executable, "-m", "benchmarks.quality.posttrain", *argv, "--workers", "1",
                "--threads", str(a.threads), "--worker"]
        procs = [subprocess.Popen(base, env={**os.environ, "QUALITY_WORKER": str(k)})
                 for k in range(a.workers)]
        if any(p.wait() for p in procs):
            raise SystemExit("a worker failed")
        store.reload()
    dense = {m: evaluate(dense_model(m, c, train_data), *test_data) for m in models}
    recs = [store.records[j.key] for j in jobs if j.key in store.records]
    png = plot_posttrain(recs, dense, os.path.join(HERE, f"accuracy-posttrain-{c.mode}.png"))
    md = os.path.join(HERE, f"results-posttrain-{c.mode}.md")
    with open(md, "w") as f:
        f.write(f"# Post-training quality (no fine-tuning) — {c.mode} mode\n\n"
                f"Command: `python -m benchmarks.quality.posttrain {' '.join(argv)}`; this "
                f"invocation {(time.time() - start) / 60:.1f} min; sum of job wall times "
                f"{sum(r.get('wall_s', 0) for r in recs) / 60:.1f} min. Dense test accuracy: "
                + ", ".join(f"{m} {v:.2f}%" for m, v in dense.items()) + ". Calibration "
                f"{c.calib_batches} x {c.calib_batch}; test images {c.test_size}. Plot: "
                f"`{os.path.basename(png)}`.\n\n"
                + posttrain_summary(recs) + "\n\nAll rows:\n\n" + posttrain_table(recs) + "\n")
    log(f"wrote {md}")

if __name__ == "__main__":
    main()
