"""Tied parameters, shared modules and channel-dependent buffers are pruned consistently,
and the input model is bit-identical afterwards.
"""
import torch
import torch.nn.functional as F

import fxprune
from hostile_models import (TiedLinear, TransposedTie, SharedByTwoNames, ChannelBuffer,
                             make, batch, Unchanged)


# ----------------------------------------------------------------------------- ties / buffers
def test_tied_parameters_are_pruned_consistently():
    """One Parameter under two names shares one set of channel ids: its uses couple
    (a's input, a's output and b's output are one group), it is sliced once and stays
    tied in the slim model, and the oracle holds."""
    model = make(TiedLinear())
    x = torch.randn(4, 5, dtype=torch.float64)
    with Unchanged(model):
        res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5)
        assert res.report.max_rel_error <= 1e-6
        assert res.plan.removed_count() == 3
        slim = res.module
        assert slim.a.weight is slim.b.weight and slim.a.weight.shape == (3, 3)
        assert slim.stem.out_features == 3 and slim.fc.in_features == 3
        replay = fxprune.apply_plan(model, res.plan, x)
        torch.testing.assert_close(replay.module(x), slim(x))
        # unstructured: one mask per tensor, listed under both names
        un = fxprune.compile(model, "l2", example_inputs=x, unstructured=True, sparsity=0.5)
    assert torch.equal(un.masks["a.weight"], un.masks["b.weight"])
    assert un.module.a.weight is un.module.b.weight
    assert float((un.module.a.weight == 0).double().mean()) == 0.5


def test_tied_parameters_groups_are_consistent():
    model = make(TiedLinear())
    groups = fxprune.groups(model, torch.randn(4, 5, dtype=torch.float64))
    for g in groups:
        dims = {(m.target, m.dim) for m in g.members}
        for target, dim in dims:
            twin = {"a.weight": "b.weight", "b.weight": "a.weight"}.get(target)
            assert twin is None or (twin, dim) in dims or not g.prunable


def test_weight_reused_transposed_is_pruned_consistently():
    """Before the fix the masked reference only cut 'consumer' slices, missing the
    transposed reuse of a 'producer' weight: verification failed on a correct model."""
    model = make(TransposedTie())
    x = torch.randn(4, 5, dtype=torch.float64)
    with Unchanged(model):
        res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5)
    assert res.report.max_rel_error <= 1e-6
    assert res.module.enc.weight.shape == (4, 5)
    kept = res.plan.kept["enc"]
    with torch.no_grad():
        h = F.relu(model.enc(x))[:, kept]
        expected = model.fc(F.linear(h, model.enc.weight[kept].t()))
    torch.testing.assert_close(res.module(x), expected)


def test_module_under_two_names_stays_shared():
    model = make(SharedByTwoNames())
    x = torch.randn(4, 5, dtype=torch.float64)
    with Unchanged(model):
        res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5)
    assert res.report.max_rel_error <= 1e-6
    assert res.plan.removed_count() > 0
    # the graph calls the one module twice (torch.fx names it by its first path)
    calls = [n.target for n in res.module.graph.nodes if n.op == "call_module"]
    assert calls.count("first") == 2 and "second" not in calls
    assert res.module.first.weight.shape[0] == res.module.first.weight.shape[1]


def test_buffers_that_depend_on_channels_are_sliced():
    model = make(ChannelBuffer())
    x = batch()[0]
    with Unchanged(model):
        res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5)
    kept = res.plan.kept["c1"]
    assert len(kept) == 3
    slim_buffers = dict(res.module.named_buffers())
    # used as is: the buffer keeps its name and loses the removed channels
    torch.testing.assert_close(slim_buffers["offset"], model.offset[kept])
    # viewed eagerly in forward: torch.fx folds the view into a constant, sliced as well
    folded = [b for n, b in slim_buffers.items() if n.startswith("_tensor_constant")]
    assert len(folded) == 1
    torch.testing.assert_close(folded[0].flatten(), model.scale[kept])
    assert res.report.max_rel_error <= 1e-6
