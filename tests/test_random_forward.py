"""A forward that samples (ViTMAE's patch shuffle in eval mode) verifies: the masked
reference and the slim model run on the same draws (passes/random_ops.py), and the
caller's random state is left as it was."""
import torch
import torch.nn as nn

import fxprune
from fxprune.passes.random_ops import random_nodes, same_draws
from fxprune.passes.frontend import capture


class NoisyNet(nn.Module):
    """Scales each sample by noise drawn in forward (shape independent of channels)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        noise = torch.rand(x.shape[0], 1, 1, 1)
        return self.c2(torch.relu(self.c1(x))) * (1 + noise)


def test_a_sampling_forward_verifies_exact():
    torch.manual_seed(0)
    model, x = NoisyNet().eval(), torch.randn(2, 3, 8, 8)
    res = fxprune.compile(model, "l2", (x,), sparsity=0.5)
    assert res.report.max_rel_error < 1e-5
    assert res.module.c1.out_channels == 4


def test_random_nodes_are_named_and_the_state_is_restored():
    gm = capture(NoisyNet().eval(), (torch.randn(2, 3, 8, 8),))
    assert [n for n in random_nodes(gm) if "rand" in n]
    state = torch.get_rng_state()
    with same_draws(gm):
        first = torch.rand(3)
    with same_draws(gm):
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.get_rng_state(), state)
    assert random_nodes(capture(nn.Sequential(nn.Linear(3, 4)).eval(), (torch.randn(2, 3),))) == []
