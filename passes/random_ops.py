"""Random draws inside a forward: which graph nodes sample, and runs on the same draws.

Why: verification compares the slim model with the masked reference on the same inputs;
a forward that samples (ViTMAE shuffles its patches by ``torch.rand`` noise even in eval
mode) would differ between the two runs for no fault of the rewrite. Both runs are made
under :func:`same_draws`, which seeds the generator alike for each and restores the
caller's random state afterwards, so sampling whose shape no pruned channel changes draws
the same numbers in both. :func:`random_nodes` names the sampling nodes for an error
when the two still differ (a draw shaped by pruned channels cannot match).

Contract: reads a GraphModule or module; writes nothing but the generator state inside
the ``with`` block (restored on exit).
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, List

import torch
import torch.fx

__all__ = ["CHECK_SEED", "random_nodes", "same_draws"]

#: The seed both runs of a check start from.
CHECK_SEED = 0

_SAMPLING = re.compile(r"(^|[._])(rand|randn|randint|randperm|rand_like|randn_like|"
                       r"randint_like|bernoulli_?|normal_?|uniform_?|multinomial|"
                       r"random_|exponential_|poisson|cauchy_|geometric_|log_normal_)($|[.])")


@contextlib.contextmanager
def same_draws(module: torch.nn.Module) -> Iterator[None]:
    """Run the block from :data:`CHECK_SEED` (CPU and the module's CUDA devices), then
    restore the random state of before."""
    devices = sorted({p.device.index or 0 for p in module.parameters()
                      if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(CHECK_SEED)
        yield


def random_nodes(gm: torch.fx.GraphModule) -> List[str]:
    """``"`node` (op)"`` for every node of ``gm`` that samples random numbers."""
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = node.target if isinstance(node.target, str) else \
            getattr(node.target, "__name__", str(node.target))
        full = str(node.target) if not isinstance(node.target, str) else name
        if _SAMPLING.search(name) or _SAMPLING.search(full):
            out.append(f"`{node.name}` ({name})")
    return out
