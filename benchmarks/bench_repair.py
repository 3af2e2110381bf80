"""Benchmark: the cost of the repair pass — ``compile(..., repair="full")`` ÷
``compile(..., repair=None)`` on the same model, batches and budget (issue: repair).

For each timm model (``pretrained=False``) and criterion, one run times, interleaved per
repeat: ``compile(model, criterion, data=batches, flops=--flops, repair=None)``, then the
same with ``repair="bn"`` and ``repair="full"``. Each figure is the median over
``--repeats`` after one warm-up; the ratio is the median of the per-repeat ratios. The
repair pass' own split (sweep, Gram sums, solves) is logged by the library at INFO level
with ``-v``.

    python benchmarks/bench_repair.py
    python benchmarks/bench_repair.py --models resnet50 --criteria l2 --repeats 3
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

import fxprune


def build(name: str, batches: int, batch: int):
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, *size, generator=gen),
             torch.randint(0, model.num_classes, (batch,), generator=gen)) for _ in range(batches)]
    return model, data


def timed(model, criterion, data, flops, repair) -> float:
    t0 = time.perf_counter()
    fxprune.compile(model, criterion, data=data, flops=flops, repair=repair, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="resnet50,vit_small_patch16_224")
    p.add_argument("--criteria", default="l2,oba")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("-v", action="store_true", help="log the library's INFO lines")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO if a.v else logging.WARNING)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {a.batches} batches "
          f"of {a.batch}, flops={a.flops}, median of {a.repeats}")
    print("| model | criterion | repair=None s | repair='bn' s | repair='full' s | bn ÷ None "
          "| full ÷ None |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models.split(","):
        model, data = build(name, a.batches, a.batch)
        for crit in a.criteria.split(","):
            timed(model, crit, data, a.flops, "full")  # warm-up
            rows = {None: [], "bn": [], "full": []}
            for _ in range(a.repeats):
                for mode in rows:
                    rows[mode].append(timed(model, crit, data, a.flops, mode))
            med = {m: statistics.median(v) for m, v in rows.items()}
            ratio = lambda m: statistics.median(x / y for x, y in zip(rows[m], rows[None]))
            print(f"| {name} | {crit} | {med[None]:.1f} | {med['bn']:.1f} | {med['full']:.1f} "
                  f"| {ratio('bn'):.2f} | {ratio('full'):.2f} |", flush=True)


if __name__ == "__main__":
    main()
