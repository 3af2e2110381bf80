"""``fill=True`` (passes/fill.py): the slack a budget's prefix leaves below the target is
given back, latest removals first. Oracle: the plain backward walk over the prefix's
removals, trying every one against the real FLOPs cost model of the fixtures."""
import random

import pytest
import torch

import fxprune
from fxprune.errors import BudgetError
from fxprune.group import Group, Member
from fxprune.models import create_model, model_input_size
from fxprune.passes.budget import Budget
from fxprune.passes.count import cost_model
from fxprune.passes.fill import give_back
from fxprune.passes.groups import analyze
from fxprune.passes.select import global_order, removable_counts, select_budget
from fxprune.passes.trace import trace
from fxprune.passes.widths import unit_step

FIXTURES = ["tiny_vit", "tiny_resnet", "tiny_densenet", "tiny_split", "tiny_se",
            "tiny_grouped", "tiny_mobilenet", "tiny_attention"]


def _setup(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, *model_input_size(name))
    analysis = analyze(trace(model, (x,)))
    costs = cost_model(analysis, (x,))
    groups = [g for g in analysis.groups if g.prunable]
    return model, x, groups, lambda kept: costs.flops(analysis.keep_mask(kept))


def backward_walk(plan, order, cost, target):
    """The reference: every removal of ``plan``, latest in ``order`` first, given back
    where the plan still fits."""
    kept = {gid: set(chans) for gid, chans in plan.items()}
    for gid, c in reversed(order):
        if c in kept[gid]:
            continue
        kept[gid].add(c)
        if cost({g: sorted(s) for g, s in kept.items()}) > target * (1 + 1e-9):
            kept[gid].discard(c)
    return {gid: sorted(s) for gid, s in kept.items()}


def _covers(big, small):
    return all(set(small[gid]) <= set(big[gid]) for gid in small)


@pytest.mark.parametrize("name", FIXTURES)
def test_fill_equals_the_backward_walk_on_real_flops(name):
    rng = random.Random(sum(map(ord, name)))
    _, _, groups, cost = _setup(name)
    dense, ran = cost({}), 0
    for trial in range(8):
        caps = removable_counts(groups, rng.choice([0.5, 0.9, 0.95]))
        scores = {g.id: torch.rand(g.size, dtype=torch.float64) for g in groups}
        normalize = rng.choice(["mean", "max", None])
        budget = Budget("flops", rng.uniform(0.25, 0.9))
        try:
            plain = select_budget(groups, scores, budget, caps, cost, dense,
                                  normalize=normalize)
        except BudgetError:  # below what this fixture's prunable groups can reach
            continue
        ran += 1
        filled = select_budget(groups, scores, budget, caps, cost, dense,
                               normalize=normalize, fill=True)
        order = global_order(groups, scores, caps, normalize)
        target = budget.ratio * dense
        assert filled == backward_walk(plain, order, cost, target), (name, trial)
        assert _covers(filled, plain) and cost(filled) <= target * (1 + 1e-9)
    assert ran >= 3


def test_fill_changes_plans_where_a_head_overshoots():
    """tiny_vit's heads are coarse units: some budgets land well below the target
    without fill, and fill gets closer (otherwise the oracle above tests little)."""
    _, _, groups, cost = _setup("tiny_vit")
    dense, caps = cost({}), removable_counts(groups, 0.95)
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64) for g in groups}
    gaps = []
    for ratio in (0.3, 0.4, 0.5, 0.6, 0.7):
        budget = Budget("flops", ratio)
        plain = cost(select_budget(groups, scores, budget, caps, cost, dense)) / dense
        filled = cost(select_budget(groups, scores, budget, caps, cost, dense,
                                    fill=True)) / dense
        gaps.append((ratio - plain, ratio - filled))
    assert any(p - f > 0.005 for p, f in gaps) and all(f <= p + 1e-12 for p, f in gaps)


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_resnet", "tiny_grouped"])
def test_round_to_gives_back_whole_units_and_stops_where_one_does_not_fit(name):
    _, _, groups, cost = _setup(name)
    dense, caps = cost({}), removable_counts(groups, 0.95)
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(2),
                               dtype=torch.float64) for g in groups}
    for ratio in (0.35, 0.6):
        budget, target = Budget("flops", ratio), ratio * dense
        plain = select_budget(groups, scores, budget, caps, cost, dense, round_to=4)
        filled = select_budget(groups, scores, budget, caps, cost, dense, round_to=4,
                               fill=True)
        assert _covers(filled, plain) and cost(filled) <= target * (1 + 1e-9)
        for g in groups:
            step, n = unit_step(g, 4), len(filled[g.id])
            assert n == g.size or n % step == 0, g.id
            gone = [c for c in range(g.size) if c not in filled[g.id]]
            if len(gone) >= step:  # one more unit of any group would not fit
                more = {**filled, g.id: sorted(filled[g.id] + gone[:step])}
                assert cost(more) > target * (1 + 1e-9), (g.id, ratio)


def test_give_back_skips_a_dear_unit_and_fills_with_cheap_ones():
    """A head (10 a channel) went last and overshot; two cheaper MLP channels (3 each)
    come back, the head does not."""
    head = Group("head", 4, [Member("qkv.weight", 0, [[0], [1], [2], [3]])])
    mlp = Group("mlp", 6, [Member("fc.weight", 0, [[c] for c in range(6)])])
    cost = lambda kept: 10.0 * len(kept["head"]) + 3.0 * len(kept["mlp"])
    plan = {"head": [0, 1, 2], "mlp": [3, 4, 5]}          # cost 39 for a target of 46
    removed = {"head": ([3], [4]), "mlp": ([0, 1, 2], [0, 1, 3])}  # (channels, places)
    got = give_back([head, mlp], plan, removed, {}, lambda k: cost(k) <= 46)
    assert got == {"head": [0, 1, 2], "mlp": [1, 2, 3, 4, 5]}  # latest first: 2, then 1


def test_compile_fill_verifies_records_and_meets_the_budget():
    torch.manual_seed(0)
    model = create_model("tiny_vit").eval()
    x = torch.randn(2, *model_input_size("tiny_vit"))
    for steps in (None, 4):
        kw = dict(example_inputs=x, flops=0.45, steps=steps, repair=None)
        plain = fxprune.compile(model, "l2", **kw)
        filled = fxprune.compile(model, "l2", fill=True, **kw)
        assert filled.plan.meta["fill"] is True and plain.plan.meta["fill"] is False
        assert plain.report.flops_ratio <= filled.report.flops_ratio <= 0.45 + 1e-9
        assert filled.report.max_rel_error < 1e-5


@pytest.mark.parametrize("name, ratio", [("tiny_vit", 0.4), ("tiny_resnet", 0.3),
                                         ("tiny_densenet", 0.6)])
def test_gradual_fill_is_the_backward_walk_over_the_unfilled_steps(name, ratio, monkeypatch):
    """With steps=, the steps are those without fill and the final plan gives back its
    removals, latest removed first, while the budget holds: the backward walk over the
    unfilled run's removal order (recorded from its selections) with the real FLOPs."""
    import fxprune.passes.gradual as gradual
    model, x, groups, cost = _setup(name)
    removals, select = [], gradual.select_budget

    def recording(*args, **kw):
        order, new = args[6], select(*args, **kw)
        removals[:] = [(gid, c) for gid, c in order if c not in new[gid]]
        return new
    monkeypatch.setattr(gradual, "select_budget", recording)
    kw = dict(example_inputs=x, flops=ratio, steps=5, repair=None)
    plain = fxprune.compile(model, "l2", **kw).plan.kept
    monkeypatch.setattr(gradual, "select_budget", select)
    filled = fxprune.compile(model, "l2", fill=True, **kw)
    full = {g.id: list(range(g.size)) for g in groups}
    walk = backward_walk({**full, **plain}, removals, cost, ratio * cost({}))
    assert {**full, **filled.plan.kept} == walk
    assert cost(walk) > cost({**full, **plain}) and filled.report.max_rel_error < 1e-5


def test_the_shortfall_note_points_at_fill_and_fill_closes_the_gap():
    """tiny_vit at flops=0.4 (seed 0): l2's prefix ends on a head and keeps 0.32; the
    report says why and what to do; with fill the plan keeps 0.399, and no note."""
    torch.manual_seed(0)
    model = create_model("tiny_vit").eval()
    x = torch.randn(2, *model_input_size("tiny_vit"))
    plain = fxprune.compile(model, "l2", example_inputs=x, flops=0.4, repair=None)
    filled = fxprune.compile(model, "l2", example_inputs=x, flops=0.4, repair=None,
                             fill=True)
    assert plain.report.flops_ratio < 0.33 and filled.report.flops_ratio > 0.39
    assert any("granularity" in n and "fill=True" in n for n in plain.report.notes)
    assert not any("granularity" in n for n in filled.report.notes)


def test_fill_with_round_to_in_gradual_steps_keeps_whole_units():
    torch.manual_seed(0)
    model = create_model("tiny_vit").eval()
    x = torch.randn(2, *model_input_size("tiny_vit"))
    res = fxprune.compile(model, "l2", example_inputs=x, flops=0.45, steps=4, repair=None,
                          round_to=4, fill=True)
    assert res.report.flops_ratio <= 0.45 + 1e-9 and res.report.max_rel_error < 1e-5
    dense = {g.id: g for g in fxprune.groups(model, x)}
    for gid, chans in res.plan.kept.items():
        n, step = len(chans), unit_step(dense[gid], 4)
        assert n == dense[gid].size or n % step == 0, gid
