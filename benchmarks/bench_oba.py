"""Benchmark: OBA scoring time per batch ÷ one plain gradient pass (design §5.1 cost).

For each timm model (pretrained=False, traced with ``torch.fx.symbolic_trace``, scored on
a :func:`~fxprune.criteria.scoring.make_scoring_copy`) and one random batch, the same run
times, interleaved per repeat:

* ``grad``: one plain gradient pass -- forward + backward of the same mean
  cross-entropy loss w.r.t. all parameters, same batch;
* ``oba``: :func:`~fxprune.criteria.oba.oba_scores` on that batch (one call = one batch);
* ``oba-exact``: :func:`~fxprune.criteria.oba.oba_exact_scores` (double backward);
* ``sosp-h``: :func:`~fxprune.criteria.sosp.sosp_h_terms` (one exact HVP) with the
  model's groups;
* ``--batch-chunk N`` scores oba / oba-exact / sosp-h in sub-batches of N samples
  (option ``batch_chunk``: memory ∝ the sub-batch, scores unchanged);
* ``obs``: the ``"obs"`` criterion's scoring (one no-grad pass per batch accumulating
  every consumer layer's input Gram matrix, then the per-layer greedy OBS solves), with
  the model's groups from ``fxprune.groups`` (issue 12: goal ≤ 2 gradient passes per
  calibration batch). With ``--batches N`` obs scores N batches in one call and its
  ratio is per batch: obs time ÷ (N × one gradient pass). ``obs-gram`` times the Gram
  pass alone (same N batches), so obs − obs-gram is the per-layer solves, paid once
  per scoring call whatever N is. ``obs`` runs at the criterion's default precision
  (``"auto"``: float32 inverses and greedy for these float32 models) and Gram
  (``gram="auto"``: convs with ≥ 1 024 inputs on channel ⊗ kernel factors); ``obs-f64``
  is ``obs`` with option ``precision="float64"``, ``obs-exact`` with ``gram="exact"``
  (every consumer on its exact Gram).

Times are medians over ``--repeats`` after one warm-up; the ratio is the median of the
per-repeat ratios. ``--clock process`` times by this process's CPU time instead of the
wall clock (steadier when the machine is oversubscribed; with ``--threads 1``). Peak memory is measured in a fresh subprocess per (model, method): on
CPU, after set-up (the model, its scoring copy and the batch) the kernel's peak-RSS mark
is reset (``/proc/self/clear_refs``) and the figure is its growth (``VmHWM`` of
``/proc/self/status``, the per-process value behind ``getrusage().ru_maxrss``, which
itself cannot be reset once a thread has exited) over the resident set size at that
point; on CUDA ``torch.cuda.max_memory_allocated`` above the post-set-up allocation.

    python benchmarks/bench_oba.py
    python benchmarks/bench_oba.py --models resnet50 --batch 8 --repeats 5 --no-memory
    python benchmarks/bench_oba.py --methods obs obs-gram --batches 4 --no-exact --no-memory
    python benchmarks/bench_oba.py --models resnet18 resnet152 --methods oba sosp-h \
        --batch-chunk 4 --threads 1

``--vit-depth D`` replaces ``vit_small_patch16_224`` by the same ViT with D blocks
(``vit_small_patch16_224:D`` as a model name does the same for one model).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import fxprune
from fxprune.criteria import ScoringContext, get_criterion
from fxprune.criteria.oba import oba_exact_scores, oba_scores
from fxprune.criteria.obs import factored_layers, find_consumers
from fxprune.criteria.obs_stats import accumulate_grams
from fxprune.criteria.scoring import default_loss, make_scoring_copy
from fxprune.criteria.sosp import sosp_h_terms
from peak_memory import peak_growth_mib

METHODS = ("grad", "oba", "oba-exact", "sosp-h", "obs", "obs-f64", "obs-exact", "obs-gram")
#: Methods scored on all ``--batches`` batches (their ratio is per batch).
PER_BATCH = ("obs", "obs-f64", "obs-exact", "obs-gram")
#: Options of the obs methods (``obs``: the criterion's defaults).
OBS_OPTIONS = {"obs": {}, "obs-f64": {"precision": "float64"}, "obs-exact": {"gram": "exact"}}


def build(name: str, batch: int, device: str, n_batches: int = 1):
    """(scoring copy of the traced timm model, ``n_batches`` random ``(inputs, targets)``,
    its groups)."""
    import timm

    torch.manual_seed(0)
    name, _, depth = name.partition(":")
    kwargs = {"depth": int(depth)} if depth else {}
    model = timm.create_model(name, pretrained=False, **kwargs).eval().to(device)
    # timm models trace with plain symbolic_trace (ViT gets two extra placeholders,
    # attn_mask/is_causal, with defaults; its fused attention is lowered by the copy).
    gm = make_scoring_copy(torch.fx.symbolic_trace(model))
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    batches = [((torch.randn(batch, *size, device=device),),
                torch.randint(0, model.num_classes, (batch,), device=device))
               for _ in range(n_batches)]
    groups = fxprune.groups(model, batches[0][0][0][:1])  # names match the traced copy's
    return gm, batches, groups


def run_method(method: str, gm, batches, groups=(), chunk=None) -> None:
    """One call of ``method``: on every batch for :data:`PER_BATCH` methods, on the first
    batch otherwise; ``chunk``: option ``batch_chunk`` of oba / oba-exact / sosp-h."""
    if method not in PER_BATCH:
        batches = batches[:1]
    if method == "grad":
        (inputs, targets), = batches
        params = [p for p in gm.parameters() if p.requires_grad]
        torch.autograd.grad(default_loss(gm(*inputs), targets), params)
    elif method == "oba":
        oba_scores(gm, batches, batch_chunk=chunk)
    elif method == "sosp-h":
        sosp_h_terms(gm, groups, batches, batch_chunk=chunk)
    elif method in OBS_OPTIONS:
        ctx = ScoringContext(module=gm, groups=list(groups), batches=batches,
                             options=OBS_OPTIONS[method])
        get_criterion("obs").score(ctx)
    elif method == "obs-gram":
        consumers = find_consumers(gm, groups)[0]
        accumulate_grams(gm, consumers, batches,
                         factored=set(factored_layers(consumers, "auto")))
    else:
        oba_exact_scores(gm, batches, batch_chunk=chunk)


def _sync(device: str) -> None:
    """Wait for queued CUDA work so wall-clock timings are complete."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_model(name: str, args) -> dict:
    """Median seconds per method and median ratios to ``grad``."""
    gm, batches, groups = build(name, args.batch, args.device, args.batches)
    methods = [m for m in METHODS if (m != "oba-exact" or args.exact)
               and (m == "grad" or m in args.methods)]
    for m in methods if args.warmup else ():            # warm-up
        run_method(m, gm, batches, groups, args.batch_chunk)
    times = {m: [] for m in methods}
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for _ in range(args.repeats):
        for m in methods:
            _sync(args.device)
            t0 = clock()
            run_method(m, gm, batches, groups, args.batch_chunk)
            _sync(args.device)
            times[m].append(clock() - t0)
    out = {m: statistics.median(v) for m, v in times.items()}
    for m in methods[1:]:
        per = len(batches) if m in PER_BATCH else 1
        out[f"{m}/grad"] = statistics.median(a / (per * b)
                                             for a, b in zip(times[m], times["grad"]))
    return out


def memory_child(name: str, method: str, args) -> float:
    """Peak memory (MiB) of one ``method`` call above the post-set-up level."""
    gm, batches, groups = build(name, args.batch, args.device, args.batches)
    return peak_growth_mib(lambda: run_method(method, gm, batches, groups, args.batch_chunk),
                           args.device)


def memory(name: str, method: str, args) -> float:
    """Peak memory (MiB) of ``method`` on ``name``, measured in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--_memory", name, method, "--batch", str(args.batch),
           "--batches", str(args.batches)] + (
           ["--batch-chunk", str(args.batch_chunk)] if args.batch_chunk else []) + [
           "--device", args.device, "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the warm-up call of each method (for slow runs)")
    p.add_argument("--batches", type=int, default=1,
                   help="calibration batches per obs / obs-gram call (ratios per batch)")
    p.add_argument("--batch-chunk", type=int, default=None,
                   help="option batch_chunk (samples per sub-batch) of oba/oba-exact/sosp-h")
    p.add_argument("--vit-depth", type=int, default=None,
                   help="score vit_small_patch16_224 with this many blocks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-exact", dest="exact", action="store_false")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="what to time besides the gradient pass (grad is always timed)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="time by wall clock, or by this process's CPU time (steadier on an "
                        "oversubscribed machine; CPU only, with --threads 1)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-time", dest="time", action="store_false",
                   help="peak memory only (no timing runs)")
    p.add_argument("--_memory", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vit_depth:
        args.models = [f"{m}:{args.vit_depth}" if m == "vit_small_patch16_224" else m
                       for m in args.models]
    return args


def main(argv=None) -> None:
    """Parse the command line, time every model, print the markdown table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory:
        print(json.dumps(memory_child(*args._memory, args)))
        return
    print(f"command: python benchmarks/bench_oba.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads, "
          f"{args.clock} clock, batch {args.batch}, {args.repeats} repeats (median"
          f"{'' if args.warmup else ', no warm-up'}), {args.batches} "
          f"calibration batch(es) per {'/'.join(PER_BATCH)} call, batch_chunk "
          f"{args.batch_chunk}\n")
    mem_kind = "peak CUDA alloc" if args.device.startswith("cuda") else "peak RSS growth"
    methods = [m for m in METHODS if (m != "oba-exact" or args.exact)
               and (m == "grad" or m in args.methods)]
    head = "".join(f" {m} (s) | {m} ÷ grad |" for m in methods[1:])
    if not args.time:
        print(f"| model | {mem_kind} {' / '.join(methods)} (MiB) | ÷ grad |\n|---|---|---|")
    else:
        print(f"| model | grad pass (s) |{head} {mem_kind} {' / '.join(methods)} (MiB) |")
        print("|---|---|" + "---|---|" * (len(methods) - 1) + "---|")
    for name in args.models:
        r = time_model(name, args) if args.time else None
        mem = "n/a"
        if args.memory:
            mem = " / ".join(f"{memory(name, m, args):.0f}" for m in methods)
        if r is None:
            peaks = [float(x) for x in mem.split(" / ")]
            rel = " / ".join(f"{x / peaks[0]:.2f}" for x in peaks[1:])
            print(f"| {name} | {mem} | {rel} |", flush=True)
            continue
        cells = "".join(f" {r[m]:.2f} | {r[f'{m}/grad']:.2f} |" for m in methods[1:])
        print(f"| {name} | {r['grad']:.2f} |{cells} {mem} |", flush=True)


if __name__ == "__main__":
    main()
