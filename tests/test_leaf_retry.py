"""Tracing retries with a failing submodule as a leaf (issue 16, coverage): when symbolic
tracing fails inside one submodule, that submodule is kept whole (its channels fixed,
with a reason naming it and the error) and the rest of the model is pruned, verified
exactly; the log and the report say so. A failure in the root's own forward still
raises ``TraceError`` with the fixes.
"""
import logging

import pytest
import torch
from torch import nn

import fxprune


class Router(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.mean() > 0:
            return self.a(x)
        return self.b(x)


class Net(nn.Module):
    def __init__(self, router=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.router = router or Router()
        self.c3 = nn.Conv2d(8, 16, 3, padding=1)
        self.c4 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.mid(torch.relu(self.stem(x))))
        x = self.router(x)
        x = torch.relu(self.c4(torch.relu(self.c3(x))))
        return self.fc(x.mean((2, 3)))


class Wrapper(nn.Module):
    """The parent's own code branches on its child's output: after the child is a leaf,
    the parent fails too and becomes the leaf."""

    def __init__(self):
        super().__init__()
        self.inner = Router()

    def forward(self, x):
        y = self.inner(x)
        return y if y.sum() > 0 else -y


class RootBranch(Net):
    def forward(self, x):
        if x.sum() > 0:  # in the root's forward: no submodule to keep whole
            return super().forward(x)
        return super().forward(-x)


X = torch.randn(2, 3, 8, 8)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_failing_submodule_becomes_a_leaf_and_the_rest_prunes(caplog):
    model = Net()
    before = _state(model)
    with caplog.at_level(logging.WARNING, logger="fxprune.passes.trace"):
        groups = {g.id: g for g in fxprune.groups(model, X)}
    assert "could not trace `router`" in caplog.text and "kept as a leaf" in caplog.text
    # the router's input channels (mid's outputs) are fixed, with a reason naming it
    assert not groups["mid"].prunable
    assert "`router` (Router) is kept whole as a leaf module" in groups["mid"].reason
    assert "control flow" in groups["mid"].reason
    assert groups["stem"].prunable and groups["c3"].prunable and groups["c4"].prunable
    res = fxprune.compile(model, "l2", example_inputs=X, flops=0.6)
    assert res.report.max_rel_error is not None and res.report.max_rel_error < 1e-5
    assert res.report.flops_ratio < 0.75
    assert "mid" not in res.plan.kept or len(res.plan.kept["mid"]) == 8
    assert any("`router` (Router) is kept whole" in n for n in res.report.notes)
    assert "kept whole as a leaf" in res.report.table()
    # the slim model keeps the router as a module and runs it for real
    assert isinstance(res.module.get_submodule("router"), Router)
    torch.testing.assert_close(res.module(X).shape, model(X).shape)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_data_criterion_and_plan_replay():
    torch.manual_seed(0)
    model = Net()
    data = [(X, torch.tensor([0, 3]))]
    res = fxprune.compile(model, "oba", data=data, flops=0.7, repair=None, progress=False)
    assert res.report.max_rel_error < 1e-4
    again = fxprune.apply_plan(model, res.plan, X)
    assert again.report.max_rel_error < 1e-5
    assert again.plan.kept == res.plan.kept


def test_parent_failing_after_its_child_becomes_the_leaf():
    model = Net(router=Wrapper())
    groups = {g.id: g for g in fxprune.groups(model, X)}
    assert "`router` (Wrapper) is kept whole" in groups["mid"].reason
    res = fxprune.compile(model, "l2", example_inputs=X, flops=0.7)
    assert res.report.max_rel_error < 1e-5
    # router.inner failed first, then router on its output: only router is reported
    notes = [n for n in res.report.notes if "kept whole as a leaf" in n]
    assert len(notes) == 1 and "`router` (Wrapper)" in notes[0]


def test_failure_in_the_root_forward_is_still_a_trace_error():
    with pytest.raises(fxprune.TraceError) as err:
        fxprune.compile(RootBranch(), "l2", example_inputs=X, flops=0.6)
    msg = str(err.value)
    assert "`<root>` (RootBranch)" in msg and "concrete_args" in msg and "torch.where" in msg


def test_explicit_leaf_needs_no_retry(caplog):
    with caplog.at_level(logging.WARNING, logger="fxprune.passes.trace"):
        groups = {g.id: g for g in fxprune.groups(Net(), X, leaf_modules=[Router])}
    assert "could not trace" not in caplog.text
    assert not groups["mid"].prunable and "unknown op Router `router`" in groups["mid"].reason


class PadConv(nn.Conv2d):
    """Like timm's Conv2dSame: a Conv2d whose forward branches on the input's size."""

    def forward(self, x):
        if x.shape[-1] % 2:
            x = torch.nn.functional.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class Repeated(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.routers = nn.ModuleList([Router() for _ in range(3)])
        self.pad = PadConv(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for r in self.routers:
            x = r(x)
        return self.fc(torch.relu(self.pad(x)).mean((2, 3)))


def test_one_retry_per_type_and_rules_still_apply(caplog):
    """Every module of a failing type becomes a leaf at once (one re-trace per type,
    not per instance); a leaf whose type has a channel rule by inheritance (a Conv2d
    subclass, as timm's Conv2dSame) is still pruned by that rule."""
    model = Repeated()
    with caplog.at_level(logging.WARNING, logger="fxprune.passes.trace"):
        res = fxprune.compile(model, "l2", example_inputs=X, sparsity=0.5)
    assert "every Router (3) is kept as a leaf" in caplog.text
    notes = [n for n in res.report.notes if n.startswith("tracing:")]
    assert len(notes) == 2 and any("the 2 other Router modules" in n for n in notes)
    groups = {g.id: g for g in fxprune.groups(model, X)}
    assert "`routers.0` (Router) is kept whole" in groups["stem"].reason  # stem feeds it
    assert groups["pad"].prunable and len(res.plan.kept["pad"]) == 6
    assert res.report.max_rel_error < 1e-5
