"""The worker of test_oba_ddp.py: one gloo rank scoring its own calibration batch with
OBA (spawned by ``torch.multiprocessing``, so it must be an importable module)."""
import torch
import torch.distributed as dist
import torch.nn as nn

from fxprune.criteria.oba import oba_scores


def model() -> nn.Module:
    """The float64 conv net every rank (and the single-process reference) scores."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).double().eval()


def run(rank, path, out, batches):
    """Rank ``rank`` of 2: OBA scores of its batch, all-reduced, saved to ``out.rank``."""
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        scores = oba_scores(torch.fx.symbolic_trace(model()), [batches[rank]])
        torch.save(scores, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
