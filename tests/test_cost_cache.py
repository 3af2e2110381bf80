"""The cached fast paths of selection's cost (issue 17) equal the plain definitions.

``Analysis.keep_mask`` reads each element's slot in one flat per-channel array (cached
on the analysis) and ``CostModel.flops``/``params`` gather all ids at once (cached per
term list). The references here are the original spellings: a mask built group by group
by comparing ``element_group`` with each group index, and a Python sum of
``size * prod(kept fraction of each array)``. They must agree exactly (bit for bit for
the costs) on every fixture under random plans, and the caches must follow edits:
replaced element maps, a resized group, a term appended to a cost model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fxprune.models import create_model, list_models, model_input_size
from fxprune.passes.count import cost_model
from fxprune.passes.groups import analyze
from fxprune.passes.trace import trace

FIXTURES = [n for n in list_models() if n.startswith("tiny_")]


def _reference_keep_mask(analysis, kept):
    keep = np.ones(analysis.space.next_id, dtype=bool)
    for gi, group in enumerate(analysis.groups):
        if group.id not in kept:
            continue
        channel_kept = np.zeros(group.size, dtype=bool)
        channel_kept[list(kept[group.id])] = True
        in_group = analysis.element_group == gi
        keep[in_group] = channel_kept[analysis.element_channel[in_group]]
    return keep


def _reference_cost(terms, keep):
    total = 0
    for size, arrays in terms:
        frac = 1.0
        for ids in arrays:
            alive = np.where(ids >= 0, keep[np.maximum(ids, 0)], True)
            frac *= alive.mean()
        total += size * frac
    return total


def _random_plan(analysis, rng):
    plan = {}
    for g in analysis.groups:
        if rng.random() < 0.25:
            continue  # not in the plan: kept whole
        n = int(rng.integers(0, g.size + 1))
        plan[g.id] = sorted(rng.choice(g.size, size=n, replace=False).tolist())
    return plan


def _analysed(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, *model_input_size(name))
    return analyze(trace(model, x)), (x,)


@pytest.mark.parametrize("name", FIXTURES)
def test_keep_mask_and_costs_equal_the_plain_definitions(name):
    analysis, inputs = _analysed(name)
    cost = cost_model(analysis, inputs)
    rng = np.random.default_rng(0)
    for _ in range(6):
        plan = _random_plan(analysis, rng)
        keep = analysis.keep_mask(plan)
        np.testing.assert_array_equal(keep, _reference_keep_mask(analysis, plan))
        assert cost.flops(keep) == _reference_cost(cost.node_flops, keep) + cost._fixed_flops
        assert cost.params(keep) == _reference_cost(cost.param_dims, keep)
    everything_cut = {g.id: [] for g in analysis.groups}
    keep = analysis.keep_mask(everything_cut)
    np.testing.assert_array_equal(keep, _reference_keep_mask(analysis, everything_cut))
    assert not keep[analysis.element_group >= 0].any()
    assert keep[analysis.element_group < 0].all()


def test_param_dims_are_each_parameters_records_in_order():
    analysis, inputs = _analysed("tiny_resnet")
    cost = cost_model(analysis, inputs)
    for (numel, arrays), (name, p) in zip(cost.param_dims, analysis.gm.named_parameters()):
        want = [rec.ids for (target, _), rec in analysis.space.records.items()
                if target == name]
        assert numel == p.numel() and len(arrays) == len(want)
        assert all(a is b for a, b in zip(arrays, want))


def test_keep_mask_follows_replaced_element_maps():
    analysis, _ = _analysed("tiny_resnet")
    group = max(analysis.groups, key=lambda g: g.size)
    plan = {group.id: [0]}
    before = analysis.keep_mask(plan)
    gi = analysis.groups.index(group)
    flipped = analysis.element_channel.copy()   # number the group's channels backwards
    in_group = analysis.element_group == gi
    flipped[in_group] = group.size - 1 - flipped[in_group]
    analysis.element_channel = flipped
    after = analysis.keep_mask(plan)
    np.testing.assert_array_equal(after, _reference_keep_mask(analysis, plan))
    assert (after != before).any()


def test_keep_mask_follows_a_resized_group():
    analysis, _ = _analysed("tiny_resnet")
    first, second = analysis.groups[0], analysis.groups[1]
    analysis.keep_mask({})              # fill the cache
    first.size += 1                     # a channel without elements
    plan = {first.id: [first.size - 1], second.id: [0]}
    np.testing.assert_array_equal(analysis.keep_mask(plan),
                                  _reference_keep_mask(analysis, plan))


def test_cost_follows_an_appended_term():
    analysis, inputs = _analysed("tiny_resnet")
    cost = cost_model(analysis, inputs)
    keep = analysis.keep_mask({analysis.groups[0].id: [0]})
    before = cost.params(keep)
    ids = next(iter(analysis.space.records.values())).ids
    cost.param_dims.append((1000, [ids]))
    after = cost.params(keep)
    assert after == _reference_cost(cost.param_dims, keep)
    assert after != before
