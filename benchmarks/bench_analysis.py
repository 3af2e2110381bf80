"""Analysis speed: fxprune's trace + shapes + groups + connectivity vs Torch-Pruning.

For timm ``resnet50`` and ``vit_base_patch16_224`` (random weights, batch 1, 224x224)
it times, in the same process and interleaved run by run,

- **fxprune**: ``trace`` (eval-mode module-tree copy, symbolic trace, shape propagation
  on meta tensors), ``analyze`` (channel labels, coupled groups with their index maps)
  and ``build_connectivity`` (series/parallel table) on that one graph: what
  ``fxprune.compile`` runs before scoring;
- **fxprune API, first call** (``fxprune-api-cold``): the analysis cache emptied, then
  ``fxprune.groups(model, x)`` followed by ``fxprune.connectivity(model, x)``: what a user
  pays the first time (one trace: connectivity reuses the groups' trace);
- **fxprune API, repeated** (``fxprune-api``): the same two calls on the unchanged model
  (the cache's fingerprint check and copies of the results: ``fxprune/analysis_cache.py``);
- **Torch-Pruning**: ``tp.DependencyGraph().build_dependency(model, example_inputs=x)``
  followed by ``list(dg.get_all_groups())``.

It reports the median wall-clock time and the median process CPU time (all threads) of
``--repeats`` runs after one warm-up, the ratio Torch-Pruning / fxprune, and prints a
markdown table, then fxprune's time per stage (trace, shape propagation, groups,
connectivity). CPU time is the steadier number on a shared machine; Torch-Pruning's
includes its real forward pass on all intra-op threads.
Torch-Pruning is an optional benchmark dependency (``pip install torch-pruning``);
without it only fxprune is timed.

``--part compile`` times, interleaved per model (resnet18/50/101, vit_small/base at
batch 1), ``fxprune.compile(model, criterion="l2", example_inputs=x, flops=0.5)`` against
Torch-Pruning's prune step as a user writes it: ``MetaPruner(model, x,
MagnitudeImportance(p=2), pruning_ratio=0.3, ignored_layers=[classifier], num_heads=...)``
and ``pruner.step()`` on a fresh deep copy of the model (the copy is not timed: compile
makes its own copies and is timed with them). A third column runs ``compile(...,
verify=False)``: the same work as Torch-Pruning's step, which checks nothing, so the
difference between the two compile columns is what the masked-equivalence check costs.

``--part share`` runs ``fxprune.compile(model, criterion="oba", data=<--batches random
batches of --batch-size 224x224 images>, flops=0.5, repair=None)`` (resnet50 and
vit_base_patch16_224 by default) and times each stage of the pipeline
(:mod:`fxprune.pipeline`: analyse = trace + shapes + groups + cost model, score,
select, rewrite + verification, finish = plan + FLOPs + report) in CPU seconds: the
share of everything around scoring is ``1 - score / total`` (issue 17: goal <= 25 %).
Repair is off: it is a pass of its own after verification, not overhead of scoring.

Usage::

    python benchmarks/bench_analysis.py
    python benchmarks/bench_analysis.py --repeats 9 --json results.json
    python benchmarks/bench_analysis.py --part compile --repeats 3
    python benchmarks/bench_analysis.py --part share --batches 4 --batch-size 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch

import fxprune
from fxprune.passes.connectivity import build_connectivity
from fxprune.passes.groups import analyze
from fxprune.passes.trace import trace

MODELS = ("resnet50", "vit_base_patch16_224")


def fxprune_pipeline(model: torch.nn.Module, x: torch.Tensor) -> int:
    """One trace, groups and connectivity on it; returns the number of groups."""
    gm = trace(model, x, share_params=True)
    groups = analyze(gm).groups
    build_connectivity(gm)
    return len(groups)


def fxprune_stages(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """CPU seconds of each stage of :func:`fxprune_pipeline` (one run)."""
    from fxprune.passes.shape_prop import propagate_shapes
    clock = time.process_time
    t0 = clock()
    gm = trace(model, None, share_params=True)
    t1 = clock()
    propagate_shapes(gm, (x,))
    t2 = clock()
    analyze(gm)
    t3 = clock()
    build_connectivity(gm)
    t4 = clock()
    return {"trace": t1 - t0, "shapes": t2 - t1, "groups": t3 - t2, "connectivity": t4 - t3}


def fxprune_api(model: torch.nn.Module, x: torch.Tensor) -> int:
    groups = fxprune.groups(model, x)
    fxprune.connectivity(model, x)
    return len(groups)


def fxprune_api_cold(model: torch.nn.Module, x: torch.Tensor) -> int:
    from fxprune import analysis_cache
    analysis_cache.clear()
    return fxprune_api(model, x)


def tp_dependency_graph(model: torch.nn.Module, x: torch.Tensor) -> int:
    import torch_pruning as tp
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        return len(list(dg.get_all_groups()))


def timed(fn: Callable[[], int]) -> Tuple[float, float, int]:
    """(wall seconds, CPU seconds, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def bench_model(name: str, tools: Dict[str, Callable], repeats: int) -> Dict[str, dict]:
    import timm
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    runs: Dict[str, List[Tuple[float, float, int]]] = {k: [] for k in tools}
    for k, fn in tools.items():
        fn(model, x)  # warm-up: imports, lazy inits, caches
    for _ in range(repeats):  # interleaved, so load changes hit every tool alike
        for k, fn in tools.items():
            runs[k].append(timed(lambda: fn(model, x)))
    out = {k: {"wall_s": statistics.median(r[0] for r in rs),
               "cpu_s": statistics.median(r[1] for r in rs),
               "groups": rs[-1][2], "runs_wall_s": [r[0] for r in rs]}
           for k, rs in runs.items()}
    stages = [fxprune_stages(model, x) for _ in range(repeats)]
    out["fxprune"]["stages_cpu_s"] = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    return out


# ------------------------------------------------------------ compile(l2) vs TP step
COMPILE_MODELS = ("resnet18", "resnet50", "resnet101", "vit_small_patch16_224",
                  "vit_base_patch16_224")


def fxprune_compile(model: torch.nn.Module, x: torch.Tensor, verify: bool = True
                    ) -> Callable[[], int]:
    """``compile(criterion="l2", flops=0.5, verify=verify)``; returns a thunk (nothing to
    prepare)."""
    def run() -> int:
        res = fxprune.compile(model, criterion="l2", example_inputs=x, flops=0.5,
                              verify=verify, progress=False)
        return sum(p.numel() for p in res.module.parameters())
    return run


def fxprune_compile_unverified(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], int]:
    """The same without the masked-equivalence check: the work Torch-Pruning's step does."""
    return fxprune_compile(model, x, verify=False)


def tp_prune_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], int]:
    """Torch-Pruning's prune step on a fresh copy (made here, outside the timing)."""
    import copy
    import torch_pruning as tp
    work = copy.deepcopy(model)
    heads = {m.qkv: m.num_heads for m in work.modules()
             if hasattr(m, "qkv") and hasattr(m, "num_heads")}

    def run() -> int:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                work, x, importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=0.3, ignored_layers=[work.get_classifier()], num_heads=heads,
                prune_head_dims=True, prune_num_heads=False)
            pruner.step()
        return sum(p.numel() for p in work.parameters())
    return run


def compile_part(names: List[str], repeats: int) -> Dict[str, dict]:
    """compile(l2) vs Torch-Pruning's step per model, interleaved; prints a table."""
    import timm
    makers = {"fxprune compile(l2)": fxprune_compile,
              "fxprune compile(l2, verify=False)": fxprune_compile_unverified,
              "Torch-Pruning step": tp_prune_step}
    results: Dict[str, dict] = {}
    for name in names:
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, 3, 224, 224)
        runs: Dict[str, List[Tuple[float, float, int]]] = {k: [] for k in makers}
        for make in makers.values():
            make(model, x)()  # warm-up
        for _ in range(repeats):
            for k, make in makers.items():
                thunk = make(model, x)
                runs[k].append(timed(thunk))
        results[name] = {k: {"wall_s": statistics.median(r[0] for r in rs),
                             "cpu_s": statistics.median(r[1] for r in rs),
                             "params_after": rs[-1][2], "runs_wall_s": [r[0] for r in rs]}
                         for k, rs in runs.items()}
        log_row(name, results[name])
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {repeats} interleaved runs\n")
    print("| model | compile(l2) wall s | TP step wall s | compile / TP wall | compile CPU s "
          "| TP CPU s | compile / TP CPU | verify=False CPU s | verify=False / TP CPU |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        fx, tp_ = r["fxprune compile(l2)"], r["Torch-Pruning step"]
        bare = r["fxprune compile(l2, verify=False)"]
        print(f"| {name} | {fx['wall_s']:.2f} | {tp_['wall_s']:.2f} | "
              f"{fx['wall_s'] / tp_['wall_s']:.2f} | {fx['cpu_s']:.2f} | {tp_['cpu_s']:.2f} | "
              f"{fx['cpu_s'] / tp_['cpu_s']:.2f} | {bare['cpu_s']:.2f} | "
              f"{bare['cpu_s'] / tp_['cpu_s']:.2f} |")
    return results


# ------------------------------------------------------------ share of compile(oba)
SHARE_MODELS = ("resnet50", "vit_base_patch16_224")
STAGES = ("analyse", "score", "select", "rewrite_and_verify", "repair", "finish")


def stage_times(run: Callable[[], object]) -> Dict[str, float]:
    """CPU seconds of each :data:`STAGES` function of :mod:`fxprune.pipeline` (summed
    over calls) and ``total`` during ``run()``; the stages are wrapped for the call only."""
    from fxprune import pipeline
    spent = {k: 0.0 for k in STAGES}
    originals = {k: getattr(pipeline, k) for k in STAGES}

    def timed_stage(name, fn):
        def wrapper(*args, **kwargs):
            c0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.process_time() - c0
        return wrapper

    for k, fn in originals.items():
        setattr(pipeline, k, timed_stage(k, fn))
    try:
        c0 = time.process_time()
        run()
        spent["total"] = time.process_time() - c0
    finally:
        for k, fn in originals.items():
            setattr(pipeline, k, fn)
    return spent


def share_part(names: List[str], repeats: int, n_batches: int, batch_size: int
               ) -> Dict[str, dict]:
    """Per model: the stage times of compile(oba) (median of ``repeats``); prints a table."""
    import timm
    results = {}
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        data = [(torch.randn(batch_size, 3, 224, 224), torch.randint(0, 1000, (batch_size,)))
                for _ in range(n_batches)]
        runs = [stage_times(lambda: fxprune.compile(model, criterion="oba", data=data,
                                                    flops=0.5, repair=None, progress=False))
                for _ in range(repeats)]
        results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {n_batches} "
          f"calibration batches of {batch_size}, median of {repeats}\n")
    cols = [k for k in STAGES if k != "repair"]
    print("| model | total CPU s | " + " | ".join(f"{k} s" for k in cols)
          + " | around scoring |\n|" + "---|" * (len(cols) + 3))
    for name, r in results.items():
        around = 1 - r["score"] / r["total"]
        print(f"| {name} | {r['total']:.1f} | " + " | ".join(f"{r[k]:.2f}" for k in cols)
              + f" | {around:.1%} |")
    return results


def log_row(name: str, row: Dict[str, dict]) -> None:
    print(name, {k: [round(w, 3) for w in v["runs_wall_s"]] for k, v in row.items()},
          flush=True)


def markdown(results: Dict[str, Dict[str, dict]]) -> str:
    has_tp = all("torch-pruning" in r for r in results.values())
    head = ["model", "fxprune wall ms", "fxprune CPU ms", "API first call wall / CPU ms",
            "API repeated wall / CPU ms"]
    if has_tp:
        head += ["Torch-Pruning wall ms", "Torch-Pruning CPU ms", "speed-up wall",
                 "speed-up CPU", "API first call speed-up wall / CPU",
                 "API repeated speed-up wall / CPU"]
    head += ["groups fxprune / TP"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        fx, api, cold = r["fxprune"], r["fxprune-api"], r["fxprune-api-cold"]
        cells = [name, f"{fx['wall_s'] * 1e3:.0f}", f"{fx['cpu_s'] * 1e3:.0f}",
                 f"{cold['wall_s'] * 1e3:.0f} / {cold['cpu_s'] * 1e3:.0f}",
                 f"{api['wall_s'] * 1e3:.1f} / {api['cpu_s'] * 1e3:.1f}"]
        groups = f"{fx['groups']}"
        if has_tp:
            tp_ = r["torch-pruning"]
            cells += [f"{tp_['wall_s'] * 1e3:.0f}", f"{tp_['cpu_s'] * 1e3:.0f}",
                      f"{tp_['wall_s'] / fx['wall_s']:.1f}x", f"{tp_['cpu_s'] / fx['cpu_s']:.1f}x",
                      f"{tp_['wall_s'] / cold['wall_s']:.1f}x / {tp_['cpu_s'] / cold['cpu_s']:.1f}x",
                      f"{tp_['wall_s'] / api['wall_s']:.0f}x / {tp_['cpu_s'] / api['cpu_s']:.0f}x"]
            groups += f" / {tp_['groups']}"
        rows.append("| " + " | ".join(cells + [groups]) + " |")
    stage_names = list(next(iter(results.values()))["fxprune"]["stages_cpu_s"])
    rows += ["", "fxprune stages, median CPU ms:", "",
             "| model | " + " | ".join(stage_names) + " |", "|" + "---|" * (len(stage_names) + 1)]
    for name, r in results.items():
        st = r["fxprune"]["stages_cpu_s"]
        rows.append(f"| {name} | " + " | ".join(f"{st[k] * 1e3:.0f}" for k in stage_names) + " |")
    return "\n".join(rows)


def main(argv=None) -> Dict[str, Dict[str, dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("analysis", "compile", "share"), default="analysis")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--batches", type=int, default=4, help="--part share: calibration batches")
    parser.add_argument("--batch-size", type=int, default=8, help="--part share: their size")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "compile":
        return compile_part(args.models or list(COMPILE_MODELS), args.repeats)
    if args.part == "share":
        return share_part(args.models or list(SHARE_MODELS), args.repeats, args.batches,
                          args.batch_size)
    tools: Dict[str, Callable] = {"fxprune": fxprune_pipeline, "fxprune-api-cold": fxprune_api_cold,
                                  "fxprune-api": fxprune_api}
    try:
        import torch_pruning  # noqa: F401
        tools["torch-pruning"] = tp_dependency_graph
    except ImportError:
        print("torch-pruning is not installed (pip install torch-pruning): timing fxprune only")
    results = {name: bench_model(name, tools, args.repeats) for name in args.models or MODELS}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved runs\n")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
