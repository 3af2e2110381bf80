"""The rewrite-based iterative mode's plan, composed into the dense numbering
(passes/compose.py): it names only dense groups, and applied to the dense model in one
rewrite it gives the model the steps built one rewrite at a time."""
import pytest
import torch

import fxprune
from fxprune.errors import BudgetError
from fxprune.passes.budget import Budget
from fxprune.passes.gradual import schedule
from test_gradual import fixture  # shared test helpers (pytest pythonpath)


@pytest.mark.parametrize("name, round_to, ratio, n", [
    # the slim tiny_split re-analyses its stem as two groups (one split part down to one
    # channel is blocked): "stem.0" and "stem.0#2", which the dense model does not have
    ("tiny_split", 4, 0.3, 4), ("tiny_split", 2, 0.2, 6), ("tiny_split", 1, 0.2, 6),
    ("tiny_resnet", 4, 0.3, 5), ("tiny_vit", 4, 0.45, 3), ("tiny_densenet", 1, 0.4, 4)])
def test_iterative_plan_applies_to_the_dense_model(name, round_to, ratio, n):
    model, x = fixture(name)
    ratios = [b.ratio for b in schedule(Budget("flops", ratio), n)]
    res = fxprune.compile(model, "l2", example_inputs=x, flops=ratios, repair=None,
                          round_to=round_to)
    dense_ids = {g.id: g.size for g in fxprune.groups(model, x)}
    assert set(res.plan.kept) <= set(dense_ids)
    assert all(len(set(c)) == len(c) and all(0 <= i < dense_ids[g] for i in c)
               for g, c in res.plan.kept.items())
    again = fxprune.apply_plan(model, res.plan, example_inputs=x, repair=None)
    with torch.no_grad():
        torch.testing.assert_close(again.module(x), res.module(x), rtol=1e-9, atol=1e-12)
    assert again.report.flops_ratio == pytest.approx(res.report.flops_ratio, abs=1e-12)
    assert sum(p.numel() for p in again.module.parameters()) == \
        sum(p.numel() for p in res.module.parameters())


@pytest.mark.parametrize("name, ratio, n, round_to", [
    ("tiny_vit", 0.45, 3, 1), ("tiny_vit", 0.3, 4, 1), ("tiny_mobilenet", 0.45, 4, 4)])
def test_iterative_fill_fills_the_final_step_as_steps_does(name, ratio, n, round_to):
    """``fill=True`` gives back the slack of the final target only, in both modes (the
    iterative mode filled every waypoint, so the two plans differed on these cases)."""
    model, x = fixture(name)
    ratios = [b.ratio for b in schedule(Budget("flops", ratio), n)]
    kw = dict(example_inputs=x, repair=None, round_to=round_to)
    masked = fxprune.compile(model, "l2", flops=ratio, steps=n, fill=True, **kw)
    rewritten = fxprune.compile(model, "l2", flops=ratios, fill=True, **kw)
    unfilled = fxprune.compile(model, "l2", flops=ratios, **kw)
    assert rewritten.plan.kept == masked.plan.kept != unfilled.plan.kept
    assert unfilled.report.flops_ratio < rewritten.report.flops_ratio <= ratio + 1e-9


@pytest.mark.parametrize("mls, round_to, ratio, n", [(0.8, 2, 0.19, 6), (0.7, 1, 0.2, 6)])
def test_iterative_steps_keep_the_dense_groups_layer_cap(mls, round_to, ratio, n):
    """max_layer_sparsity caps what a *dense* group loses over all steps, also after the
    re-analysed slim model splits it (its free part's own size is not the cap's base:
    the first case removed 13 of the stem's 16 channels against a cap of 12)."""
    model, x = fixture("tiny_split")
    ratios = [b.ratio for b in schedule(Budget("flops", ratio), n)]
    res = fxprune.compile(model, "l2", example_inputs=x, flops=ratios, repair=None,
                          round_to=round_to, max_layer_sparsity=mls)
    sizes = {g.id: g.size for g in fxprune.groups(model, x)}
    assert all(sizes[g] - len(k) <= int(mls * sizes[g]) for g, k in res.plan.kept.items())
    assert res.report.flops_ratio <= ratio + 1e-9


def test_iterative_steps_refuse_a_budget_only_the_cap_breach_reached():
    """Where the split group's free part was the cap's base, this budget was met by
    removing 12 of the stem's 16 channels against a cap of 11; now it is refused, as
    steps= refuses it."""
    model, x = fixture("tiny_split")
    ratios = [b.ratio for b in schedule(Budget("flops", 0.15), 8)]
    kw = dict(example_inputs=x, repair=None, max_layer_sparsity=0.7)
    with pytest.raises(BudgetError, match="cannot be reached"):
        fxprune.compile(model, "l2", flops=ratios, **kw)
    with pytest.raises(BudgetError, match="cannot be reached"):
        fxprune.compile(model, "l2", flops=0.15, steps=8, **kw)
