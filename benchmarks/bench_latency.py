"""Dense vs slim CPU latency at hardware-friendly widths (issues: rewrite, 17).

    python -m benchmarks.bench_latency [--threads 1] [--repeats 12] [--rounds 3] [--round-to 1 8 16]
        [--models resnet50 mobilenetv2_100 vit_small_patch16_224] [--ratios 0.5 0.3]
        [--batch 8] [--profile]

For each timm model (pretrained=False, batch 8, 224x224), kept-FLOPs target and
``round_to=N`` (criterion l2): median latency of the dense and the slim model, measured
alternately in rounds within one process; the speed-up is the median of the rounds'
dense ÷ slim ratios (their range in brackets), and the efficiency = speed-up divided by
the ideal speed-up 1 / kept FLOPs (1.0: the FLOPs saving fully shows up as time).
"kept FLOPs" is the report's count (fxprune's yardstick); "kept FLOPs incl. attention"
recounts dense and slim with ``torch.utils.flop_counter`` under the math attention
backend, which also counts the attention products Q·Kᵀ and P·V (the counter sees no
FLOPs in the CPU's fused attention kernel). ``--profile`` adds, per configuration, the
ATen ops that take the most dense time and how much of it the slim model still takes.
"""
import argparse
import platform
import statistics
import time
from typing import Dict, List

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fxprune



def median_ms(module, x, repeats: int) -> float:
    with torch.no_grad():
        module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved(dense, slim, x, repeats: int, rounds: int = 3):
    """Median dense and slim latency (ms) over ``rounds`` alternating rounds, and the
    speed-ups of the rounds (dense ÷ slim of each round: a burst of load on a shared
    machine hits one round's pair, not the whole run's medians)."""
    d, s = [], []
    for _ in range(rounds):  # interleave to share the machine's noise
        d.append(median_ms(dense, x, repeats // rounds + 1))
        s.append(median_ms(slim, x, repeats // rounds + 1))
    return statistics.median(d), statistics.median(s), [a / b for a, b in zip(d, s)]


def math_flops(module, x) -> int:
    """FLOPs of one forward with attention in its math form (products counted)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        module(x)
    return fc.get_total_flops()


def op_times(module, x, runs: int = 2) -> Dict[str, float]:
    """Self CPU ms per ATen op over ``runs`` forwards, per forward."""
    with torch.no_grad():
        module(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                module(x)
    return {e.key: e.self_cpu_time_total / 1e3 / runs for e in prof.key_averages()}


def profile_rows(dense, slim, x, top: int = 8) -> List[str]:
    """Markdown rows: the ``top`` ops by dense time, dense ms, slim ms and slim share."""
    d, s = op_times(dense, x), op_times(slim, x)
    total_d, total_s = sum(d.values()), sum(s.values())
    rows = [f"  all ops: dense {total_d:.1f} ms, slim {total_s:.1f} ms ({total_s / total_d:.2f})"]
    for op in sorted(d, key=d.get, reverse=True)[:top]:
        rows.append(f"  {op}: dense {d[op]:.1f} ms ({d[op] / total_d:.0%}), slim "
                    f"{s.get(op, 0.0):.1f} ms ({s.get(op, 0.0) / max(d[op], 1e-9):.2f} of dense)")
    return rows


def measure(name: str, ratios, round_tos, x, repeats: int, rounds: int, profile: bool
            ) -> List[tuple]:
    """One row per (target, round_to) of model ``name``."""
    model = timm.create_model(name, pretrained=False).eval()
    dense_math = math_flops(model, x[:1])
    rows = []
    for ratio in ratios:
        for n in round_tos:
            res = fxprune.compile(model, "l2", example_inputs=x[:1], flops=ratio, round_to=n,
                                  verify=False, progress=False)
            d, s, per_round = interleaved(model, res.module, x, repeats, rounds)
            kept = res.report.flops_ratio
            kept_attn = math_flops(res.module, x[:1]) / dense_math
            speedup = statistics.median(per_round)
            rows.append((name, ratio, n, kept, kept_attn, d, s, speedup, min(per_round),
                         max(per_round), speedup * kept, speedup * kept_attn))
            print(f"# {rows[-1]}", flush=True)
            if profile:
                print("\n".join(profile_rows(model, res.module, x)), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating dense/slim rounds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", nargs="+",
                        default=["resnet50", "mobilenetv2_100", "vit_small_patch16_224"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--round-to", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--profile", action="store_true", help="per-op dense/slim times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 224, 224)
    rows = [r for name in args.models
            for r in measure(name, args.ratios, args.round_to, x, args.repeats, args.rounds,
                             args.profile)]
    print(f"\ntorch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, batch {args.batch}, 224x224, {args.rounds} rounds of "
          f"{args.repeats // args.rounds + 1} runs\n")
    print("| model | target | round_to | kept FLOPs | kept FLOPs incl. attention | dense ms "
          "| slim ms | speed-up (rounds) | speed-up ÷ (1/kept) | ÷ (1/kept incl. attention) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ratio, n, kept, ka, d, s, sp, lo, hi, eff, eff_a in rows:
        print(f"| {name} | {ratio} | {n} | {kept:.3f} | {ka:.3f} | {d:.1f} | {s:.1f} | "
              f"{sp:.2f}x ({lo:.2f}-{hi:.2f}) | {eff:.2f} | {eff_a:.2f} |")


if __name__ == "__main__":
    main()
