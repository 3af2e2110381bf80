"""The worker of test_obs_ddp.py: one gloo rank summing obs' calibration statistics (an
exact Gram and a factored one) over its own batch (spawned by ``torch.multiprocessing``,
so it must be an importable module)."""
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn

from fxprune.criteria.obs_stats import accumulate_grams

#: Consumers scored on the channel x kernel factored Gram (the rest: the exact Gram).
FACTORED = {"2"}


def model() -> nn.Module:
    """The float64 conv net every rank (and the single-process reference) measures."""
    torch.manual_seed(0)   # dtype given, so that the init does not follow the default dtype
    f64 = torch.float64
    return nn.Sequential(nn.Conv2d(2, 4, 3, dtype=f64), nn.ReLU(),
                         nn.Conv2d(4, 3, 3, bias=True, dtype=f64), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 3, dtype=f64)).eval()


def statistics(module, batches):
    """``{layer: {sum name: tensor}}`` of every consumer's statistics over ``batches``."""
    consumers = {name: SimpleNamespace(layer=module[int(name)]) for name in ("2", "4")}
    grams, _, samples = accumulate_grams(module, consumers, batches, factored=FACTORED)
    out = {"samples": torch.tensor(samples)}
    for name, g in grams.items():
        sums = [g.A, g.B, g.s] if name in FACTORED else list(g.panels)
        out.update({f"{name}:{k}": t for k, t in enumerate(sums)})
        out[f"{name}:yy"] = torch.tensor([g.yy, g.rows], dtype=torch.float64)
    return out


def run(rank, path, out, batches):
    """Rank ``rank`` of 2: its batch's statistics, all-reduced, saved to ``out.rank``."""
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        torch.save(statistics(model(), [batches[rank]]), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
