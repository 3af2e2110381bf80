"""round_to=N: hardware-friendly kept widths (passes/widths.py, issue 17)."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import BudgetError
from fxprune.passes.widths import rounded_removal
from fxprune.models.fixtures import TinyMLP, TinyVGG
from fxprune.models.fixtures_transformer import TinyViT


def _valid(size, r, cap, step):
    return r == 0 or (1 <= r <= cap and (size - r) % step == 0 and size - r >= step)


@pytest.mark.parametrize("size,cap,step", [(16, 15, 4), (20, 19, 8), (10, 9, 3), (7, 6, 8),
                                           (33, 20, 16), (12, 5, 4)])
def test_rounded_removal_is_the_nearest_valid_count_and_monotone(size, cap, step):
    previous = 0
    for wanted in range(0, cap + 1):
        r = rounded_removal(size, wanted, cap, step)
        assert _valid(size, r, cap, step)
        valid = [v for v in range(1, cap + 1) if _valid(size, v, cap, step)]
        if wanted and valid:  # brute force: nearest valid count, ties remove more
            best = min(valid, key=lambda v: (abs(v - wanted), -v))
            assert r == best
        assert r >= previous  # selection's bisection needs a monotone cost
        previous = r


def _kept_counts(result):
    return {row.id: (row.size, row.kept) for row in result.report.groups}


@pytest.mark.parametrize("n,flops", [(4, 0.5), (8, 0.85)])  # 8-channel layers stay whole at 8
def test_compile_keeps_multiples_and_meets_the_budget(n, flops):
    torch.manual_seed(0)
    model = TinyVGG().eval()
    x = torch.randn(2, 3, 16, 16)
    res = fxprune.compile(model, "l2", example_inputs=x, flops=flops, round_to=n)
    pruned = [(s, k) for s, k in _kept_counts(res).values() if k < s]
    assert pruned, "nothing was pruned"
    assert all(k % n == 0 for _, k in pruned)
    assert res.report.flops_ratio <= flops + 1e-9
    assert res.report.max_rel_error is not None  # verified exact
    assert res.plan.meta["round_to"] == n


@pytest.mark.parametrize("steps", [None, 3])
def test_a_split_groups_kept_width_is_a_multiple_too(steps):
    """tiny_split's stem feeds three split parts, each of which must keep a channel (the
    span guard refuses the last one): the rounding counts removed channels, so a refused
    entry no longer leaves the stem at 5 of 16 with round_to=4."""
    torch.manual_seed(0)
    model = fxprune.models.create_model("tiny_split").eval()
    x = torch.randn(2, 3, 16, 16)
    res = fxprune.compile(model, "l2", example_inputs=x, params=0.3, round_to=4, steps=steps,
                          repair=None)
    pruned = [(s, k) for s, k in _kept_counts(res).values() if k < s]
    assert len(pruned) >= 3 and all(k % 4 == 0 for _, k in pruned), pruned
    assert res.report.params_ratio <= 0.3 + 1e-9


def test_heads_count_their_dims():
    torch.manual_seed(0)
    model = TinyViT(dim=32, heads=8).eval()   # head_dim 4: round_to=8 keeps pairs of heads
    x = torch.randn(2, 3, 16, 16)
    res = fxprune.compile(model, "l2", example_inputs=x, flops=0.6, round_to=8)
    heads = [row for row in res.report.groups if row.kind == "head" and row.kept < row.size]
    assert heads and all(row.kept % 2 == 0 for row in heads)
    others = [row for row in res.report.groups if row.kind != "head" and row.kept < row.size]
    assert all(row.kept % 8 == 0 for row in others)


def test_round_to_one_is_the_default_plan():
    torch.manual_seed(0)
    model = TinyMLP(in_features=16, hidden=32).eval()
    x = torch.randn(4, 16)
    a = fxprune.compile(model, "l2", example_inputs=x, flops=0.6)
    b = fxprune.compile(model, "l2", example_inputs=x, flops=0.6, round_to=1)
    assert a.plan.kept == b.plan.kept


def test_sparsity_budget_rounds_too():
    torch.manual_seed(0)
    model = TinyMLP(in_features=16, hidden=32).eval()
    res = fxprune.compile(model, "l2", example_inputs=torch.randn(4, 16), sparsity=0.3,
                          round_to=8)
    pruned = [(s, k) for s, k in _kept_counts(res).values() if k < s]
    assert pruned and all(k % 8 == 0 for _, k in pruned)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "16"])
def test_bad_round_to_is_refused(bad):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(BudgetError, match="round_to"):
        fxprune.compile(model, "l2", example_inputs=torch.randn(2, 4), flops=0.5, round_to=bad)


def test_unreachable_budget_names_round_to():
    model = TinyVGG().eval()
    with pytest.raises(BudgetError, match="round_to=8"):
        fxprune.compile(model, "l2", example_inputs=torch.randn(2, 3, 16, 16), flops=0.5,
                        round_to=8)
