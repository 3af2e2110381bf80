"""The benchmark's job list, the resumable results store, and the shared work queue that
lets ``--workers N`` processes split the jobs between them.

Contract: ``job_list`` is a pure function of the config and the command-line switches, so
every worker process builds the same list; ``WorkQueue.claim`` hands each job to exactly
one process per invocation (an ``fcntl`` lock around a claims file); finished jobs are
appended to the ``Store`` file, one JSON line each, and skipped by any later run.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List

from .fx_runs import fx_job, iterative_job
from .nets import log
from .tp_runs import tp_job, tp_names


@dataclass
class Job:
    key: str  # unique in the store: model|budget|method|seed
    meta: Dict  # the row's identifying columns
    model: str  # which dense model the job prunes
    fn: Callable  # fn(model, ctx) -> the row's measured columns

    @property
    def claim_id(self) -> str:
        """The key without spaces: one whitespace-free token per line of the claims file."""
        return self.key.replace(" ", "")


def job_list(c, no_tp: bool, no_iterative: bool, repair: str = "none") -> List[Job]:
    """Every job of the config, the longest first (iterative schedules, then Torch-Pruning's
    Hessian, whose per-sample gradients dominate) so parallel workers finish together."""
    jobs: List[Job] = []
    tp_models = ["resnet"] if c.mode == "quick" else ["resnet", "vit"]
    for name in c.models:
        if name == "resnet" and not no_iterative:
            for crit in ("oba", "l2"):
                meta = dict(model=name, budget=c.iterative, kind="iterative", seed=0,
                            criterion=crit)
                fn = functools.partial(_iterative, criterion=crit, budgets=c.iterative)
                jobs.append(Job(f"{name}|iter{c.iterative}|{crit}|0", meta, name, fn))
        for budget in c.budgets:
            for seed in range(c.seeds):
                methods = list(c.criteria)
                if not no_tp and name in tp_models and not (c.mode == "quick" and seed > 0):
                    methods += tp_names()
                for method in methods:
                    is_tp = method in tp_names()
                    meta = dict(model=name, budget=budget, criterion=method, seed=seed,
                                kind="oneshot")
                    key = f"{name}|{budget}|{method}|{seed}"
                    if is_tp:
                        fn = functools.partial(_tp, method=method, budget=budget, seed=seed)
                    else:
                        fn = functools.partial(_fx, method=method, budget=budget, seed=seed,
                                               repair=repair)
                        if repair != "none":  # rows without the key suffix: no repair
                            meta["repair"], key = repair, key + f"|repair={repair}"
                    jobs.append(Job(key, meta, name, fn))
    return sorted(jobs, key=_expected_cost, reverse=True)


def _expected_cost(job: Job) -> int:
    # stable sort: the job-list order is kept within a cost class
    return 2 if job.meta["kind"] == "iterative" else int(job.meta["criterion"] == "tp-hessian")


def _fx(model, ctx, method, budget, seed, repair="none"):
    return fx_job(model, method, budget, seed, ctx, repair)


def _tp(model, ctx, method, budget, seed):
    return tp_job(model, method, budget, seed, ctx, ctx.name == "vit")


def _iterative(model, ctx, criterion, budgets):
    return iterative_job(model, criterion, budgets, 0, ctx)


class Store:
    """Append-only JSON-lines results keyed by job; lets a rerun resume. Several processes
    may append to one file: each record is one ``write`` of one line in append mode."""

    def __init__(self, path: str):
        self.path = path
        self.records: Dict[str, Dict] = {}
        self.reload()

    def reload(self) -> None:
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    if line.strip():
                        r = json.loads(line)
                        self.records[r["key"]] = r

    def run(self, job: Job, model, ctx) -> Dict:
        if job.key in self.records:
            return self.records[job.key]
        log(f"job {job.key}")
        t0 = time.time()
        rec = {**job.meta, **job.fn(model, ctx), "key": job.key, "wall_s": time.time() - t0}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.records[job.key] = rec
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                 if k in ("flops", "params", "acc_before", "acc_after", "prune_s", "error")}
        log(f"  done {job.key}: {shown}")
        return rec


class WorkQueue:
    """Hands out the jobs not yet in the store, each to one process (claims file + lock).
    The parent creates a fresh claims file per invocation, so a crashed worker's job is
    claimed again by the next invocation."""

    def __init__(self, path: str):
        self.path = path

    def reset(self) -> None:
        with open(self.path, "w"):
            pass

    def claim(self, jobs: List[Job], store: Store) -> Iterator[Job]:
        while True:
            with open(self.path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.seek(0)
                claimed = set(f.read().split())
                store.reload()
                job = next((j for j in jobs if j.claim_id not in claimed
                            and j.key not in store.records), None)
                if job is not None:
                    f.write(job.claim_id + "\n")
                fcntl.flock(f, fcntl.LOCK_UN)
            if job is None:
                return
            yield job
