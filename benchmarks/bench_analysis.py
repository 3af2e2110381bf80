"""Analysis speed: fxprune's trace + shapes + groups + connectivity vs Torch-Pruning.

For timm ``resnet50`` and ``vit_base_patch16_224`` (random weights, batch 1, 224x224)
it times, in the same process and interleaved run by run,

- **fxprune**: ``trace`` (eval-mode module-tree copy, symbolic trace, shape propagation
  on meta tensors), ``analyze`` (channel labels, coupled groups with their index maps)
  and ``build_connectivity`` (series/parallel table) on that one graph: what
  ``fxprune.compile`` runs before scoring;
- **fxprune API**: ``fxprune.groups(model, x)`` followed by ``fxprune.connectivity(model,
  x)`` (two traces; what a user calling the public API pays);
- **Torch-Pruning**: ``tp.DependencyGraph().build_dependency(model, example_inputs=x)``
  followed by ``list(dg.get_all_groups())``.

It reports the median wall-clock time and the median process CPU time (all threads) of
``--repeats`` runs after one warm-up, the ratio Torch-Pruning / fxprune, and prints a
markdown table, then fxprune's time per stage (trace, shape propagation, groups,
connectivity). CPU time is the steadier number on a shared machine; Torch-Pruning's
includes its real forward pass on all intra-op threads.
Torch-Pruning is an optional benchmark dependency (``pip install torch-pruning``);
without it only fxprune is timed.

Usage::

    python benchmarks/bench_analysis.py
    python benchmarks/bench_analysis.py --repeats 9 --json results.json
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


def markdown(results: Dict[str, Dict[str, dict]]) -> str:
    has_tp = all("torch-pruning" in r for r in results.values())
    head = ["model", "fxprune wall ms", "fxprune CPU ms", "fxprune API wall ms"]
    if has_tp:
        head += ["Torch-Pruning wall ms", "Torch-Pruning CPU ms", "speed-up wall",
                 "speed-up CPU"]
    head += ["groups fxprune / TP"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        fx, api = r["fxprune"], r["fxprune-api"]
        cells = [name, f"{fx['wall_s'] * 1e3:.0f}", f"{fx['cpu_s'] * 1e3:.0f}",
                 f"{api['wall_s'] * 1e3:.0f}"]
        groups = f"{fx['groups']}"
        if has_tp:
            tp_ = r["torch-pruning"]
            cells += [f"{tp_['wall_s'] * 1e3:.0f}", f"{tp_['cpu_s'] * 1e3:.0f}",
                      f"{tp_['wall_s'] / fx['wall_s']:.1f}x", f"{tp_['cpu_s'] / fx['cpu_s']:.1f}x"]
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
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tools: Dict[str, Callable] = {"fxprune": fxprune_pipeline, "fxprune-api": fxprune_api}
    try:
        import torch_pruning  # noqa: F401
        tools["torch-pruning"] = tp_dependency_graph
    except ImportError:
        print("torch-pruning is not installed (pip install torch-pruning): timing fxprune only")
    results = {name: bench_model(name, tools, args.repeats) for name in args.models}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved runs\n")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
