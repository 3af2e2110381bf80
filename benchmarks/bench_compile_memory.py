"""Benchmark: peak memory of a whole ``compile`` ÷ one forward+backward (issue 17).

Issue 17's goal: ``compile`` as a whole costs at most 1.5× the peak RSS of one
forward+backward pass of the same batch, and deep-copies the model at most once. For
each timm model (``pretrained=False``) and one random batch, each figure comes from a
fresh subprocess (so no earlier peak or cache hides it), after the model and the batch
are built:

* ``grad``: the user's eager model, mean cross-entropy of the batch, ``backward()``;
* ``compile:CRIT``: ``fxprune.compile(model, criterion=CRIT, data=[(x, y)], flops=0.5)``
  with compile's defaults otherwise (``repair="auto"``, i.e. full repair with data;
  verification on). ``CRIT`` may carry options as ``oba,batch_chunk=2``.

The figure is the growth of the peak resident set above the level at the start of the
call (``benchmarks/peak_memory.py``: the kernel's peak mark is reset first). The child
also counts the weight copies that ``copy.deepcopy`` of an ``nn.Module`` makes, in model
sizes: the bytes of the copy's parameters and buffers with storage of their own ÷ the
model's (a structural copy that shares the tensors counts 0). Rounds of all methods alternate (``--repeats``); the
table gives the median per method and its ratio to ``grad``.

    python benchmarks/bench_compile_memory.py --models resnet18 resnet50 --criteria l2 oba
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from typing import Dict, List

import torch
from torch import nn

from peak_memory import peak_growth_mib


def _build(name: str, batch: int):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(batch, *size)
    y = torch.randint(0, model.num_classes, (batch,))
    return model, x, y


def _tensors(module: nn.Module):
    return [t for t in list(module.parameters()) + list(module.buffers()) if t.numel()]


def _method_call(method: str, model: nn.Module, x, y):
    """The zero-argument call that ``method`` measures."""
    import fxprune

    if method == "grad":
        def grad():
            nn.functional.cross_entropy(model(x), y).backward()
        return grad
    name, *pairs = method.split(":", 1)[1].split(",")
    options = {k: int(v) if v.isdigit() else v for k, v in (p.split("=") for p in pairs)}
    return lambda: fxprune.compile(model, criterion=name, data=[(x, y)], flops=0.5,
                                   progress=False, **options)


def child(name: str, method: str, batch: int) -> Dict[str, float]:
    """Peak growth (MiB) and model deep copies of one call, in this process."""
    model, x, y = _build(name, batch)
    call = _method_call(method, model, x, y)
    copies = {"n": 0.0, "depth": 0}
    real = copy.deepcopy
    weight_bytes = sum(t.nbytes for t in _tensors(model))

    def counting(obj, memo=None, _nil=[]):   # same signature as copy.deepcopy
        top = copies["depth"] == 0 and isinstance(obj, nn.Module)
        copies["depth"] += 1
        try:
            out = real(obj, memo)
        finally:
            copies["depth"] -= 1
        if top:   # in model sizes: tensors of the copy that got storage of their own
            old = {t.data_ptr() for t in _tensors(obj)}
            copies["n"] += sum(t.nbytes for t in _tensors(out)
                               if t.data_ptr() not in old) / weight_bytes
        return out

    copy.deepcopy = counting
    try:
        peak = peak_growth_mib(call)
    finally:
        copy.deepcopy = real
    return {"peak_mib": peak, "model_copies": copies["n"]}


def measure(name: str, method: str, batch: int, threads: int) -> Dict[str, float]:
    cmd = [sys.executable, __file__, "--_child", name, method, "--batch", str(batch),
           "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(results: Dict[str, Dict[str, List[Dict[str, float]]]]) -> str:
    lines = ["| model | method | peak RSS growth (MiB, median) | ÷ grad | weight copies (model sizes) |",
             "|---|---|---|---|---|"]
    for name, by_method in results.items():
        grad = statistics.median(r["peak_mib"] for r in by_method["grad"])
        for method, runs in by_method.items():
            peak = statistics.median(r["peak_mib"] for r in runs)
            copies = max(r["model_copies"] for r in runs)
            lines.append(f"| {name} | {method} | {peak:.0f} | {peak / grad:.2f} | {copies:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vit_small_patch16_224"])
    p.add_argument("--criteria", nargs="+", default=["l2", "oba"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--_child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(child(*args._child, args.batch)))
        return
    methods = ["grad"] + [f"compile:{c}" for c in args.criteria]
    results: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    for name in args.models:
        results[name] = {m: [] for m in methods}
        for _ in range(args.repeats):
            for m in methods:
                results[name][m].append(measure(name, m, args.batch, args.threads))
                print(f"{name} {m}: {results[name][m][-1]}", file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
