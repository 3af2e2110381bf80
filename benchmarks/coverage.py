"""Coverage: how many timm models beyond the zoo prune and verify, tried as a new user would.

The sample (fixed, not chosen by outcome): ``sorted(timm.list_models())`` without the
zoo's timm models (:data:`ZOO`, the ones tests/test_compile_zoo.py prunes), then every
k-th name, ``k = len(candidates) // 50``, from the first: 50 names spread evenly over
timm's alphabet (so over its architecture families). The list depends on the timm
version, which every row records.

Each model runs in its own subprocess (a hang or a crash costs one row), one intra-op
thread, under a wall-clock limit (``--timeout``, default 600 s) and an address-space
limit (``--memory-gb``, default 6: the development machine has 24 GiB shared by several
sessions); a model that does not fit is ``memory-limit``, not measured rather than
refused (a billion-parameter model needs 4 GiB for its float32 weights alone):

1. build: ``timm.create_model(name, pretrained=False, img_size=64)``; a model that does not
   take ``img_size`` is built plainly. The input is ``[1, 3, 64, 64]``; when the dense
   model does not run on it, the model is rebuilt plainly and run at its default input
   size (``pretrained_cfg["input_size"]``). A model that cannot run at either is
   ``build-failed`` (not fxprune's doing);
2. ``fxprune.compile(model, criterion="l2", flops=0.7, example_inputs=x)`` (default
   verification). Outcomes: ``pruned`` (verified; kept FLOPs ratio and max relative
   error recorded), ``refused`` (an ``FxpruneError``: its class and message name the
   reason), ``crashed`` (any other exception: a bug to fix), ``timeout``.

Rows go to ``benchmarks/coverage_results.jsonl`` as they finish, one JSON object per
line; a later run skips the names already there (resume). ``--table`` prints the
markdown table from the rows (benchmarks/RESULTS.md holds the committed one).

Usage::

    nice -n 10 python -m benchmarks.coverage            # run / resume the 50
    python -m benchmarks.coverage --list                 # the sample, nothing run
    python -m benchmarks.coverage --table                # markdown from the rows
    nice -n 10 python -m benchmarks.coverage --names a,b --memory-gb 16 --note "why"
                                                         # (re)measure some names of the
                                                         # sample: drop their rows first;
                                                         # the note goes in note_rerun
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

ROWS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "coverage_results.jsonl")
#: the timm models of the zoo tests (tests/test_compile_zoo.py FULL), left out of the sample
ZOO = ("resnet50", "resnext50_32x4d", "vit_base_patch16_224", "deit_small_patch16_224",
       "swin_tiny_patch4_window7_224", "beit_base_patch16_224", "convnext_tiny",
       "efficientnet_b0", "mobilenetv3_large_100", "regnety_016", "densenet121",
       "mixer_b16_224", "levit_128")
SMALL = 64


def sample(n: int = 50) -> List[str]:
    """Every k-th name of timm's sorted model list, the zoo left out (module docstring)."""
    import timm
    candidates = [m for m in sorted(timm.list_models()) if m not in ZOO]
    k = len(candidates) // n
    return [candidates[i * k] for i in range(n)]


def _build(name: str):
    """``(model, input, how)`` as the module docstring's step 1 describes."""
    import timm
    import torch
    torch.manual_seed(0)
    small = torch.randn(1, 3, SMALL, SMALL)
    try:
        model, how = timm.create_model(name, pretrained=False, img_size=SMALL), f"img_size={SMALL}"
    except TypeError:
        model, how = timm.create_model(name, pretrained=False), "default"
    model.eval()
    try:
        with torch.no_grad():
            model(small)
        return model, small, f"{how}, input {SMALL}x{SMALL}"
    except Exception:
        pass
    model = timm.create_model(name, pretrained=False).eval()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    x = torch.randn(1, *size)
    with torch.no_grad():
        model(x)
    return model, x, f"default, input {size[1]}x{size[2]}"


def run_one(name: str) -> Dict:
    """One model: build, compile, classify the outcome (runs in the child process)."""
    import timm
    import torch

    import fxprune
    torch.set_num_threads(1)
    row: Dict = {"model": name, "timm": timm.__version__}
    start = time.perf_counter()
    try:
        model, x, how = _build(name)
    except Exception as exc:
        row.update(status=_memory_or(exc, "build-failed"),
                   error=f"{type(exc).__name__}: {_line(exc)}")
        return row
    row.update(build=how, params=sum(p.numel() for p in model.parameters()))
    try:
        res = fxprune.compile(model, criterion="l2", flops=0.7, example_inputs=x)
    except fxprune.FxpruneError as exc:
        row.update(status="refused", error=f"{type(exc).__name__}: {_line(exc)}")
    except Exception as exc:  # not an FxpruneError: a bug (unless out of memory)
        row.update(status=_memory_or(exc, "crashed"), error=f"{type(exc).__name__}: {_line(exc)}")
    else:
        rep = res.report
        groups = rep.groups
        row.update(status="pruned", flops_ratio=round(rep.flops_ratio, 4),
                   max_rel_error=rep.max_rel_error,
                   prunable_groups=sum(g.prunable for g in groups), groups=len(groups),
                   frontend=rep.frontend,
                   leaves=[n for n in rep.notes if n.startswith("tracing:")])
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _memory_or(exc: Exception, status: str) -> str:
    """``"memory-limit"`` for an allocation failure under the address-space limit."""
    text = str(exc)
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "bad_alloc" in text:
        return "memory-limit"
    return status


def _limit_memory(gb: float) -> None:
    import resource
    limit = int(gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _line(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def done_rows(path: str = ROWS) -> Dict[str, Dict]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["model"]: r for r in (json.loads(line) for line in f if line.strip())}


def run_all(names: List[str], timeout: float, memory_gb: float, path: str = ROWS,
            note: str = "", rerun: bool = False) -> None:
    """Run the models not yet in ``path`` (all of ``names`` with ``rerun``), appending
    one row per model as it ends (with ``note`` as its ``note_rerun`` field when given);
    a model's last row is the one the table shows."""
    done = {} if rerun else done_rows(path)
    for name in names:
        if name in done:
            continue
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.coverage", "--one", name,
               "--memory-gb", str(memory_gb)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                 cwd=os.path.dirname(os.path.dirname(ROWS)))
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "model": name, "status": "crashed",
                "error": f"exit {out.returncode}: {_line(Exception(out.stderr[-400:]))}"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": "timeout", "error": f"over {timeout:.0f} s"}
        row.setdefault("seconds", round(time.perf_counter() - start, 1))
        if note:
            row["note_rerun"] = note
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {row['status']} {row.get('error', '')}", flush=True)


def table(names: List[str], path: str = ROWS) -> str:
    """Markdown: counts, then one line per model of the sample (in sample order)."""
    rows = done_rows(path)
    counts: Dict[str, int] = {}
    for name in names:
        status = rows.get(name, {}).get("status", "not run yet")
        counts[status] = counts.get(status, 0) + 1
    head = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    out = [f"{len(names)} models — {head}", "",
           "| model | outcome | build | front end | kept FLOPs | max rel. error | prunable groups "
           "| s | reason / note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = rows.get(name, {"status": "not run yet"})
        err = r.get("max_rel_error")
        note = r.get("error") or "; ".join(r.get("leaves", []))
        groups = f"{r['prunable_groups']} / {r['groups']}" if "groups" in r else ""
        # rows measured before the front end was recorded show "" (not re-run)
        out.append(f"| {name} | {r['status']} | {r.get('build', '')} | {r.get('frontend', '')} "
                   f"| {r.get('flops_ratio', '')} "
                   f"| {'' if err is None else f'{err:.1e}'} | {groups} | {r.get('seconds', '')} "
                   f"| {note.replace('|', '/')} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", help="run one model and print its row (used by the parent)")
    p.add_argument("--list", action="store_true", help="print the sample and exit")
    p.add_argument("--table", action="store_true", help="print the markdown table")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    p.add_argument("--memory-gb", type=float, default=6.0, help="address-space limit per model")
    p.add_argument("-n", type=int, default=50, help="sample size")
    p.add_argument("--names", help="comma-separated names of the sample to run (only those)")
    p.add_argument("--note", default="", help="note_rerun field of the rows this run writes")
    p.add_argument("--rerun", action="store_true",
                   help="run the --names models again even if they have a row")
    args = p.parse_args(argv)
    if args.one:
        _limit_memory(args.memory_gb)
        print(json.dumps(run_one(args.one)), flush=True)
        return
    names = sample(args.n)
    if args.list:
        print("\n".join(names))
    elif args.table:
        print(table(names))
    else:
        if args.names:
            wanted = args.names.split(",")
            unknown = sorted(set(wanted) - set(names))
            if unknown:
                p.error(f"not in the sample: {', '.join(unknown)}")
            names = [n for n in names if n in wanted]
        if args.rerun and not args.names:
            p.error("--rerun needs --names (it would re-run the whole sample)")
        run_all(names, args.timeout, args.memory_gb, note=args.note, rerun=args.rerun)


if __name__ == "__main__":
    main()
