"""Benchmark: analysis of an 8-billion-parameter decoder without its weights (issue 13).

Torch-Pruning's users report that its graph build never finishes on 8B Llama-style
models. Here the model is built on the ``meta`` device from the Llama-3-8B config (32
layers, hidden 4096, 32 query / 8 key-value heads, MLP 14336, vocabulary 128256: no
weights are allocated, nothing is downloaded), and timed through the public API as a
user calls it: ``fxprune.groups(model, (input_ids,))`` (the torch.export front end, chosen
automatically, then the analysis). Reported: wall time, the process's peak RSS, the
number of groups and prunable groups by kind, and whether the GQA head groups have the
expected sizes (8 KV-head groups per layer, each with its 4 query heads).

Torch-Pruning's ``DependencyGraph().build_dependency`` is run on the same meta model in a
subprocess under ``--tp-timeout`` seconds (``--no-tp`` skips it); a timeout or an error is
reported as such.

    python benchmarks/bench_llm_meta.py                  # 32 layers
    python benchmarks/bench_llm_meta.py --layers 4 --tp-timeout 300
"""
from __future__ import annotations

import argparse
import collections
import json
import resource
import subprocess
import sys
import time

import torch

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, use_cache=False)


def meta_llama(layers: int):
    import transformers
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).eval()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_fxprune(layers: int, seq: int) -> dict:
    import fxprune
    model = meta_llama(layers)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.zeros(1, seq, dtype=torch.long)
    start = time.perf_counter()
    groups = fxprune.groups(model, (ids,))
    wall = time.perf_counter() - start
    kinds = collections.Counter(g.kind for g in groups if g.prunable)
    heads = [g for g in groups if g.kind == "head" and g.prunable]
    return {"tool": "fxprune", "layers": layers, "params": params, "seconds": round(wall, 1),
            "peak_rss_gib": round(peak_rss_gib(), 2), "groups": len(groups),
            "prunable_by_kind": dict(kinds),
            "kv_head_groups_of_8": sum(g.size == 8 for g in heads) == layers == len(heads)}


def run_tp(layers: int, seq: int) -> dict:
    import torch_pruning as tp
    model = meta_llama(layers)
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    start = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=ids)
    n = len(list(dg.get_all_groups()))
    return {"tool": "torch-pruning", "layers": layers, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(peak_rss_gib(), 2), "groups": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--tp-timeout", type=int, default=1800)
    ap.add_argument("--only", choices=["fxprune", "tp"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.only:
        print(json.dumps((run_fxprune if a.only == "fxprune" else run_tp)(a.layers, a.seq)))
        return
    tools = ["fxprune"] + ([] if a.no_tp else ["tp"])
    for tool in tools:  # each in its own process: its own peak RSS, a hang costs one row
        cmd = [sys.executable, __file__, "--layers", str(a.layers), "--seq", str(a.seq),
               "--only", tool]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 timeout=a.tp_timeout if tool == "tp" else None)
            rows = [line for line in out.stdout.splitlines() if line.startswith("{")]
            print(rows[-1] if rows else json.dumps(
                {"tool": tool, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}))
        except subprocess.TimeoutExpired:
            print(json.dumps({"tool": tool, "layers": a.layers,
                              "error": f"no result within {a.tp_timeout} s"}))


if __name__ == "__main__":
    main()
