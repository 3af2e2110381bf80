"""SOSP benchmarks: SOSP-H cost relative to one gradient pass, SOSP-I scaling in S.

Part ``hessian``: for timm ``resnet50`` and ``vit_small_patch16_224`` (random weights,
batch 8, traced with ``fxprune.passes.trace.trace``, scored on a scoring copy) it
times one SOSP-H batch (forward, backward with ``create_graph``, Hessian-vector
product, per-parameter products) against one plain gradient pass (forward + backward
of the loss) and reports the ratio (goal ≤ 5).

Part ``sosp-i``: a plain conv-BN-ReLU chain of 4 layers of width w (S = 4w structures,
10 classes, batch 32, 3×16×16 inputs) scored with ``"sosp-i"`` in both Jacobian modes;
reports seconds and peak memory (growth of the resident set of a fresh subprocess per
run on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) as S grows. Forward mode
(S JVPs of the batch) runs only up to ``--forward-max-width``.

Usage::

    python benchmarks/bench_sosp.py                  # both parts, CPU
    python benchmarks/bench_sosp.py --part sosp-i --widths 16 32 64
    python benchmarks/bench_sosp.py --device cuda --widths 16 32 64 128 256 512
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.criteria import ScoringContext, get_criterion
from fxprune.criteria.scoring import make_scoring_copy
from fxprune.criteria.sosp import sosp_h_terms
from fxprune.passes.trace import trace
from peak_memory import peak_growth_mib

log = logging.getLogger("bench_sosp")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best_of(fn, repeats: int, device: str) -> float:
    fn()                                   # warm-up (allocator, kernels, lazy inits)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_hessian(name: str, device: str, repeats: int) -> Dict[str, object]:
    """SOSP-H batch time ÷ gradient-pass time for one timm model."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    x = torch.randn(8, 3, 224, 224)
    y = torch.randint(0, 1000, (8,))
    groups = fxprune.groups(model, x)
    scoring = make_scoring_copy(trace(model, x)).to(device)
    batch = [((x.to(device),), y.to(device))]
    params = [p for p in scoring.parameters() if p.requires_grad]

    def grad_pass():
        loss = F.cross_entropy(scoring(*batch[0][0]), batch[0][1])
        torch.autograd.grad(loss, params)

    def sosp_h():
        sosp_h_terms(scoring, groups, batch)

    t_grad = _best_of(grad_pass, repeats, device)
    t_sosp = _best_of(sosp_h, repeats, device)
    structures = sum(g.size for g in groups if g.prunable)
    return {"model": name, "device": device, "structures": structures,
            "grad_s": round(t_grad, 3), "sosp_h_s": round(t_sosp, 3),
            "ratio": round(t_sosp / t_grad, 2)}


class Chain(nn.Module):
    """4 × (conv3×3 → BN → ReLU) of width w, max-pool after layer 2, linear head."""

    def __init__(self, w: int, classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for i in range(4):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def bench_sosp_i_one(width: int, mode: str, device: str) -> Dict[str, object]:
    """One SOSP-I scoring run (one batch of 32); time and peak memory."""
    torch.manual_seed(0)
    model = Chain(width).eval()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    groups = fxprune.groups(model, x)
    ctx = ScoringContext(make_scoring_copy(trace(model, x)).to(device), groups,
                         [((x.to(device),), y.to(device))], None,
                         options={"jacobian": mode})
    crit = get_criterion("sosp-i")
    timing = {}

    def score():
        _sync(device)
        t0 = time.perf_counter()
        crit.score(ctx)
        _sync(device)
        timing["score"] = time.perf_counter() - t0

    peak_mb = peak_growth_mib(score, device)
    t_score = timing["score"]
    state = ctx.state["sosp"]
    caps = {g.id: g.size - 1 for g in groups if g.prunable}
    t0 = time.perf_counter()
    crit.select([g for g in groups if g.prunable], {}, ctx, caps)
    t_greedy = time.perf_counter() - t0
    return {"width": width, "S": len(state["ids"]), "mode": mode,
            "score_s": round(t_score, 3), "greedy_s": round(t_greedy, 3),
            "peak_extra_mb": round(peak_mb, 1)}


def bench_sosp_i(widths: List[int], modes: List[str], device: str,
                 forward_max_width: int) -> List[Dict[str, object]]:
    """One subprocess per (width, mode) so that the peak resident set is per run.
    Forward mode costs S JVPs of the batch, so it runs only up to ``forward_max_width``."""
    rows = []
    for w in widths:
        for mode in modes:
            if mode == "forward" and w > forward_max_width:
                continue
            cmd = [sys.executable, __file__, "--one", str(w), mode, "--device", device,
                   "--threads", str(torch.get_num_threads())]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                log.error("width %d %s failed: %s", w, mode, out.stderr[-2000:])
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            log.info("%s", rows[-1])
    return rows


def _table(rows: List[Dict[str, object]]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(str(r[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "hessian", "sosp-i"], default="all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    ap.add_argument("--widths", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    ap.add_argument("--modes", nargs="+", default=["reverse", "forward"])
    ap.add_argument("--forward-max-width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--one", nargs=2, metavar=("WIDTH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(bench_sosp_i_one(int(args.one[0]), args.one[1], args.device)))
        return
    if args.part in ("all", "hessian"):
        rows = [bench_hessian(m, args.device, args.repeats) for m in args.models]
        log.info("SOSP-H batch time / gradient pass (goal <= 5):\n%s", _table(rows))
    if args.part in ("all", "sosp-i"):
        rows = bench_sosp_i(args.widths, args.modes, args.device, args.forward_max_width)
        log.info("SOSP-I scaling in S (batch 32, 10 classes):\n%s", _table(rows))


if __name__ == "__main__":
    main()
