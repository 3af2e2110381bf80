"""Cost-aware ranking (``cost_aware=True``, passes/unit_cost.py).

Oracles: the per-channel savings equal FLOPs / parameter counts worked out by hand from
the layer shapes of a conv chain; the cost-aware order equals a brute-force sort by
(|score| ÷ group mean) ÷ saving; the selected plan equals the reference prefix search of
``test_select_prefix`` fed that order. Then: compile applies it and records it, and every
combination it cannot serve is refused before scoring, naming the option.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.models.fixtures import TinyVGG
from fxprune.passes.budget import Budget
from fxprune.passes.count import cost_model
from fxprune.passes.groups import analyze
from fxprune.passes.select import _order_arrays, removable_counts, select_budget
from fxprune.passes.trace import trace
from fxprune.passes.unit_cost import MIN_SAVING, unit_costs
from test_select_prefix import ref_select_budget

C_IN, A, B, C_OUT, SIDE, K = 3, 8, 6, 5, 8, 3


class ConvChain(nn.Module):
    """conv(3→8) on 8×8 → relu → conv(8→6, stride 2: 4×4) → relu → conv(6→5)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(C_IN, A, K, padding=1)
        self.c2 = nn.Conv2d(A, B, K, stride=2, padding=1)
        self.c3 = nn.Conv2d(B, C_OUT, K, padding=1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def _chain():
    torch.manual_seed(0)
    model = ConvChain().eval()
    x = torch.randn(1, C_IN, SIDE, SIDE)
    analysis = analyze(trace(model, x))
    groups = [g for g in analysis.groups if g.prunable]
    return model, x, analysis, groups


def _by_layer(groups):
    """{"A": group cut between c1 and c2, "B": between c2 and c3} (by size)."""
    return {{A: "A", B: "B"}[g.size]: g for g in groups}


def test_savings_are_the_hand_counted_flops_and_params_of_one_channel():
    _, x, analysis, groups = _chain()
    costs = cost_model(analysis, (x,))
    caps = removable_counts(groups, 0.95)
    scores = {g.id: torch.rand(g.size) for g in groups}
    k2, full, half = K * K, SIDE * SIDE, (SIDE // 2) ** 2  # c2 halves each side
    # conv FLOPs = 2 × output positions × kernel × C_in × C_out (bias not counted)
    flops = {"A": 2 * k2 * (full * C_IN + half * B), "B": 2 * k2 * half * (A + C_OUT)}
    params = {"A": k2 * C_IN + 1 + k2 * B, "B": k2 * A + 1 + k2 * C_OUT}
    for kind, expected in (("flops", flops), ("params", params)):
        measure = getattr(costs, kind)
        saving = unit_costs(groups, scores, caps, lambda kept: measure(analysis.keep_mask(kept)))
        got = {name: saving[g.id] for name, g in _by_layer(groups).items()}
        assert got == pytest.approx(expected, rel=1e-12), kind


def test_a_group_that_saves_nothing_is_floored_not_divided_by_zero():
    _, _, _, groups = _chain()
    a, b = _by_layer(groups)["A"], _by_layer(groups)["B"]
    caps = {a.id: 2, b.id: 2}
    scores = {g.id: torch.ones(g.size) for g in groups}

    def cost(kept):  # only group A's width costs anything
        return float(len(kept.get(a.id, range(a.size))) * 7)
    saving = unit_costs(groups, scores, caps, cost)
    assert saving[a.id] == 7.0
    assert saving[b.id] == MIN_SAVING * 7.0
    assert unit_costs(groups, scores, {a.id: 0, b.id: 0}, cost) == {}


def _brute_force_order(groups, scores, caps, savings):
    entries = []
    for g in groups:
        s = scores[g.id].double().abs().numpy()
        for c in np.argsort(s, kind="stable")[:caps[g.id]]:
            entries.append((s[c] / s.mean() / savings[g.id], g.id, int(c)))
    return [(gid, c) for _, gid, c in sorted(entries, key=lambda e: e[0])]


@pytest.mark.parametrize("seed", range(4))
def test_cost_aware_order_and_plan_equal_the_brute_force_knapsack_greedy(seed):
    _, x, analysis, groups = _chain()
    costs = cost_model(analysis, (x,))
    caps = removable_counts(groups, 0.95)
    gen = torch.Generator().manual_seed(seed)
    scores = {g.id: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in groups}

    def cost(kept):
        return costs.flops(analysis.keep_mask(kept))
    savings = unit_costs(groups, scores, caps, cost)
    order = _brute_force_order(groups, scores, caps, savings)
    ids, entry_group, channels = _order_arrays(groups, scores, caps, "mean", None, savings)
    assert [(ids[i], c) for i, c in zip(entry_group.tolist(), channels.tolist())] == order
    dense = cost({})
    for ratio in (0.8, 0.5, 0.3):
        budget = Budget("flops", ratio)
        got = select_budget(groups, scores, budget, caps, cost, dense, cost_aware=True)
        ref = ref_select_budget(groups, scores, budget, caps, cost, dense, order, 1)
        assert got == ref, ratio


def test_equal_scores_go_first_where_a_channel_saves_most():
    """With every score equal, plain ranking cannot tell the groups apart; cost-aware
    removes from group A (5 184 FLOPs a channel) before group B (3 744)."""
    _, x, analysis, groups = _chain()
    costs = cost_model(analysis, (x,))
    caps = removable_counts(groups, 0.95)
    scores = {g.id: torch.ones(g.size) for g in groups}

    def cost(kept):
        return costs.flops(analysis.keep_mask(kept))
    kept = select_budget(groups, scores, Budget("flops", 0.8), caps, cost, cost({}),
                         cost_aware=True)
    layers = _by_layer(groups)
    assert len(kept[layers["B"].id]) == B
    assert len(kept[layers["A"].id]) == A - 2  # 2 × 5 184 ≥ 20 % of 50 112 > 5 184


def test_compile_applies_it_verifies_and_records_it():
    torch.manual_seed(0)
    model = TinyVGG().eval()
    x = torch.randn(2, 3, 16, 16)
    plain = fxprune.compile(model, "l2", example_inputs=x, flops=0.5)
    aware = fxprune.compile(model, "l2", example_inputs=x, flops=0.5, cost_aware=True)
    assert aware.plan.meta["cost_aware"] is True and plain.plan.meta["cost_aware"] is False
    assert aware.report.flops_ratio <= 0.5 + 1e-9
    assert aware.report.max_rel_error is not None and aware.report.max_rel_error < 1e-5
    assert aware.plan.kept != plain.plan.kept
