"""Pointwise unary ops carry channels through (the passthrough rule of
passes/tensor_rules.py): each output channel is a function of the same input channel, on
both front ends, and the rewrite stays exact."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

UNARY = {
    "logsigmoid": F.logsigmoid, "softsign": F.softsign, "softshrink": F.softshrink,
    "hardshrink": F.hardshrink, "rrelu": F.rrelu, "threshold": lambda x: F.threshold(x, 0.1, 0.),
    "expit": torch.special.expit, "erfc": torch.erfc, "sinc": torch.sinc,
    "log1p": lambda x: torch.log1p(x.abs()), "expm1": torch.expm1,
    "reciprocal": lambda x: torch.reciprocal(x.abs() + 1), "atan": torch.atan,
    "floor": torch.floor, "round": torch.round, "frac": torch.frac, "trunc": torch.trunc,
    "logit": lambda x: torch.logit(torch.sigmoid(x)), "sin method": lambda x: x.sin(),
    "expm1 method": lambda x: x.expm1(), "LogSigmoid": nn.LogSigmoid(), "Softsign": nn.Softsign(),
    "Softshrink": nn.Softshrink(), "Hardshrink": nn.Hardshrink(), "RReLU": nn.RReLU(),
    "Threshold": nn.Threshold(0.1, 0.0),
}


class _Block(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(4, 8), nn.Linear(8, 2), act

    def forward(self, x):
        return self.b(self.act(self.a(x) * 3))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_op_keeps_the_hidden_channels_prunable(name, frontend):
    torch.manual_seed(0)
    act = UNARY[name]
    model = _Block(act if isinstance(act, nn.Module) else _Fn(act)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    hidden = {g.id: g for g in fxprune.groups(model, x, frontend=frontend)}["a"]
    assert hidden.prunable, hidden.reason
    res = fxprune.compile(model, "l2", x, sparsity=0.5, frontend=frontend, progress=False)
    assert res.report.max_rel_error < 1e-10


class _Fn(nn.Module):
    """A function as a module whose forward calls it (so it is traced, not a leaf)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)
