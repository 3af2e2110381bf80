"""Dense vs slim CPU latency (issue: rewrite).

    python benchmarks/bench_latency.py [--threads 2] [--repeats 20]

For timm resnet50 and vit_small_patch16_224 (pretrained=False, batch 8, 224x224) at
flops=0.5 and 0.3 (criterion l2): median latency of the dense and the slim model,
measured alternately in one process, and the efficiency = measured speedup divided by
the ideal speedup 1 / kept-FLOPs ratio (1.0 = the FLOPs saving fully shows up as time).
"""
import argparse
import platform
import statistics
import time

import timm
import torch

import fxprune


def median_ms(module, x, repeats):
    with torch.no_grad():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default="resnet50,vit_small_patch16_224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(8, 3, 224, 224)
    rows = []
    for name in args.models.split(","):
        model = timm.create_model(name, pretrained=False).eval()
        for ratio in (0.5, 0.3):
            res = fxprune.compile(model, "l2", example_inputs=x[:1], flops=ratio, verify=False,
                                  progress=False)
            dense, slim = [], []
            for _ in range(3):  # interleave to share the machine's noise
                dense.append(median_ms(model, x, args.repeats // 3 + 1))
                slim.append(median_ms(res.module, x, args.repeats // 3 + 1))
            d, s = statistics.median(dense), statistics.median(slim)
            kept = res.report.flops_ratio
            rows.append((name, ratio, kept, d, s, d / s, (d / s) * kept))
            print(f"# {rows[-1]}", flush=True)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, batch 8, 224x224\n")
    print("| model | target | kept FLOPs | dense ms | slim ms | speedup | speedup ÷ (1/kept) |")
    print("|---|---|---|---|---|---|---|")
    for name, ratio, kept, d, s, sp, eff in rows:
        print(f"| {name} | {ratio} | {kept:.3f} | {d:.1f} | {s:.1f} | {sp:.2f}x | {eff:.2f} |")


if __name__ == "__main__":
    main()
