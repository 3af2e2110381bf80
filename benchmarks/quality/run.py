"""Quality benchmark driver: ``python -m benchmarks.quality.run [--quick] ...`` (see README.md).

Trains (or loads cached) dense models, prunes each with every criterion / Torch-Pruning
importance at every kept-FLOPs budget, measures test accuracy before and after a shared
fine-tuning recipe, and writes results-<mode>.md and accuracy-<mode>.png next to this file.
Results are appended to results/<mode>-<config hash>.jsonl as they finish; a rerun resumes.
``--workers N`` runs the jobs in N processes of this module (``--worker``) that share a
work queue (jobs.py); the parent then writes the table from the shared results file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace
from typing import Dict, List, Optional, Set

import torch

import fxprune

from . import config as cfg_mod
from .data import calibration_batches, load_split
from .jobs import Job, Store, WorkQueue, job_list
from .nets import evaluate, log, trained_model
from .report import plot, summary, table
from .tp_runs import tp_version

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
CHECKPOINTS = os.path.join(HERE, "checkpoints")
RESULTS = os.path.join(HERE, "results")  # finished rows, committed: a rerun resumes


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
    p.add_argument("--repair", choices=("none", "bn", "full"), default="none",
                   help="fxprune's repair pass before fine-tuning (rows keyed by it; "
                        "Torch-Pruning rows are the same for every value)")
    p.add_argument("--no-iterative", action="store_true", help="skip the iterative schedule")
    p.add_argument("--report-only", action="store_true",
                   help="write the table/plot from the finished jobs, run nothing new")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the jobs (e.g. 2 on a 2-core machine)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: cores / workers)")
    p.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be >= 1")
    if a.threads is None:
        a.threads = max(1, (os.cpu_count() or 1) // a.workers)
    return a


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


def dense_model(name: str, c, train_data) -> torch.nn.Module:
    """The trained dense model: from the committed checkpoints (``checkpoints/``, a few
    hundred kB each, so a fresh machine does not retrain for an hour), or trained now."""
    return trained_model(name, c.train[name], train_data, CHECKPOINTS)


def model_context(name: str, c, train_data, test_data):
    """The trained dense model and what every job of it shares."""
    model = dense_model(name, c, train_data)
    ctx = SimpleNamespace(name=name, train_data=train_data, test_data=test_data,
                          ft_recipe=c.ft[name], iter_ft_steps=c.iter_ft_steps,
                          hessian_samples=c.hessian_samples, bisect_iters=c.bisect_iters,
                          calib={s: calibration_batches(*train_data, c.calib_batches,
                                                        c.calib_batch, s) for s in range(c.seeds)})
    return model, ctx


def run_jobs(jobs: List[Job], store: Store, queue: Optional[WorkQueue], c, data) -> None:
    """Run the jobs not in the store; with a queue, only those this process claims."""
    contexts: Dict[str, tuple] = {}
    todo = queue.claim(jobs, store) if queue else (j for j in jobs if j.key not in store.records)
    for job in todo:
        if job.model not in contexts:
            contexts[job.model] = model_context(job.model, c, *data)
        store.run(job, *contexts[job.model])


def run_workers(argv: List[str], a: argparse.Namespace, c, queue: WorkQueue) -> None:
    """``--workers N``: train the dense models in parallel (one process each), then let N
    worker processes claim jobs from the shared queue. Later flags override earlier ones."""
    base = [sys.executable, "-m", "benchmarks.quality.run", *argv, "--workers", "1",
            "--threads", str(a.threads)]

    def wait_all(procs):
        failed = [p.args for p in procs if p.wait() != 0]
        if failed:
            raise SystemExit(f"{len(failed)} worker process(es) failed: {failed[0]}")

    wait_all([subprocess.Popen(base + ["--train-only", "--models", m]) for m in c.models])
    queue.reset()
    wait_all([subprocess.Popen(base + ["--worker"], env={**os.environ, "QUALITY_WORKER": str(k)})
              for k in range(a.workers)])


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


def write_outputs(c, a, store: Store, keys: Set[str], dense: Dict[str, float], wall: float,
                  argv) -> str:
    recs = [r for k, r in store.records.items() if k in keys]
    reduced = (a.train_epochs, a.ft_steps, a.calib_batches) != (None, None, None)
    label = c.mode + ("-reduced" if reduced else "") + \
        (f"-repair-{a.repair}" if a.repair != "none" else "")  # not the earlier table's file
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
    os.makedirs(CACHE, exist_ok=True)
    os.makedirs(CHECKPOINTS, exist_ok=True)
    os.makedirs(RESULTS, exist_ok=True)
    start = time.time()
    store = Store(os.path.join(RESULTS, f"{c.mode}-{c.tag()}.jsonl"))
    queue = WorkQueue(os.path.join(CACHE, os.path.basename(store.path) + ".claims"))
    train_data, test = load_split("train"), load_split("test")
    test_data = (test[0][:c.test_size], test[1][:c.test_size])
    if a.train_only:
        for m in c.models:
            dense_model(m, c, train_data)
        return
    jobs = job_list(c, a.no_tp, a.no_iterative, a.repair)
    done = sum(j.key in store.records for j in jobs)
    log(f"mode {c.mode}: {len(jobs)} jobs, {done} already done -> {store.path}; "
        f"criteria registered: {sorted(fxprune.list_criteria())}")
    if a.worker:
        return run_jobs(jobs, store, queue, c, (train_data, test_data))
    if a.workers > 1 and not a.report_only:
        run_workers(argv, a, c, queue)
        store.reload()
    elif not a.report_only:
        run_jobs(jobs, store, None, c, (train_data, test_data))
    dense = {}
    for m in c.models:
        dense[m] = evaluate(dense_model(m, c, train_data), *test_data)
        log(f"{m}: dense test accuracy {dense[m]:.2f}% on {len(test_data[0])} images")
    md = write_outputs(c, a, store, {j.key for j in jobs}, dense, time.time() - start, argv)
    log(f"wrote {md} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
