"""Selection's fast prefix plans (passes/prefix.py, issue 17) give exactly the plans of the
original per-channel algorithm, kept here as a slow reference: random scores (with many
ties), tie-breaks, caps, ``round_to``, normalisers and orders over the fixture models'
groups, and a cost that is a pseudo-random function of the plan, so that only the same
probe sequence over the same plans can give the same answer."""
import hashlib
import random

import numpy as np
import pytest
import torch

from fxprune.errors import BudgetError
from fxprune.group import Group, Member, member_spans
from fxprune.passes.budget import Budget
from fxprune.passes.prefix import spans_of
from fxprune.passes.select import (global_order, removable_counts, select_budget,
                                   select_uniform)
from fxprune.passes.widths import rounded_removal, unit_step
from goldens import analysed

FIXTURES = ["tiny_densenet", "tiny_split", "tiny_se", "tiny_vit", "tiny_resnet",
            "tiny_attention", "tiny_grouped", "tiny_mobilenet", "tiny_convnext"]


# ------------------------------------------------ the original algorithm (reference)
class RefGuard:
    def __init__(self, groups):
        self.of_channel, self.full = {}, {}
        for g in groups:
            spans = member_spans(g)
            if spans:
                self.full[g.id] = [len(s) for s in spans]
                self.of_channel[g.id] = {}
                for k, span in enumerate(spans):
                    for c in span:
                        self.of_channel[g.id].setdefault(c, []).append(k)
        self.left = {gid: list(n) for gid, n in self.full.items()}

    def remove(self, gid, c):
        ks = self.of_channel.get(gid, {}).get(c, ())
        if any(self.left[gid][k] <= 1 for k in ks):
            return False
        for k in ks:
            self.left[gid][k] -= 1
        return True


def ref_global_order(groups, scores, caps, normalize, tiebreak=None):
    def scale(s):
        v = {"max": s.max, "mean": s.mean}.get(normalize) if s.size else None
        v = v() if v is not None else 1.0
        return v if v > 0 else 1.0
    entries = []
    for g in groups:
        if g.id not in caps or caps[g.id] == 0:
            continue
        s = scores[g.id].double().abs().numpy()
        t = None if tiebreak is None else tiebreak[g.id].double().abs().numpy()
        w = np.zeros_like(s) if t is None else t / scale(t)
        order = np.lexsort((w, s))[:caps[g.id]]
        entries.extend((s[c] / scale(s), w[c], g.id, int(c)) for c in order)
    entries.sort(key=lambda e: (e[0], e[1]))
    return [(gid, c) for _, _, gid, c in entries]


def ref_select_budget(groups, scores, budget, caps, cost, dense, order, round_to):
    in_caps = [g for g in groups if g.id in caps]
    sizes = {g.id: g.size for g in in_caps}
    steps = {g.id: unit_step(g, round_to) for g in in_caps}
    by_group = {gid: [] for gid in sizes}
    rank = []
    for gid, c in order:
        by_group[gid].append(c)
        rank.append((gid, len(by_group[gid])))

    def kept_after(k):
        wanted = dict.fromkeys(sizes, 0)
        for gid, n in rank[:k]:
            wanted[gid] = n
        guard, kept = RefGuard(in_caps), {}
        for gid, n in sizes.items():
            # walk the group's whole sequence: its accepted channels in order, and how
            # many of them the prefix reaches; cap and round that count of channels
            accepted, within = [], 0
            for c in dict.fromkeys(by_group[gid]):
                if guard.remove(gid, c):
                    accepted.append(c)
                    within += by_group[gid].index(c) < wanted[gid]
            r = rounded_removal(n, within, min(caps[gid], len(accepted)), steps[gid])
            removed = set(accepted[:r])
            kept[gid] = [c for c in range(n) if c not in removed]
        return kept

    target = budget.ratio * dense
    lo, hi = 0, len(order)
    if cost(kept_after(hi)) > target * (1 + 1e-9):
        raise BudgetError("unreachable")
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(kept_after(mid)) <= target * (1 + 1e-9):
            hi = mid
        else:
            lo = mid + 1
    return kept_after(lo)


# ------------------------------------------------------------------------ helpers
def _scores(rng, groups, tied):
    """Per group: few distinct values (ties within and across groups) or distinct ones."""
    out = {}
    for g in groups:
        if tied:
            out[g.id] = torch.tensor([float(rng.choice([0, 1, 2, 3])) for _ in range(g.size)])
        else:
            out[g.id] = torch.tensor([rng.uniform(-1, 1) for _ in range(g.size)])
    return out


def _cost(sizes, monotone):
    """A plan's cost: kept channels weighted per group, or a hash of the whole plan."""
    weight = {gid: 1 + i % 5 for i, gid in enumerate(sizes)}

    def cost(kept):
        if monotone:
            return float(sum(weight[gid] * len(ix) for gid, ix in kept.items()))
        digest = hashlib.sha1(repr(sorted(kept.items())).encode()).digest()
        return int.from_bytes(digest[:4], "little") / 2 ** 32
    return cost


def _both(groups, scores, budget, caps, cost, dense, order, round_to, normalize="mean",
          tiebreak=None):
    """(new plan or error text, reference plan or error text); ``order=None``: the new
    code ranks the channels itself, the reference by :func:`ref_global_order`."""
    ref_order = order if order is not None else ref_global_order(groups, scores, caps,
                                                                 normalize, tiebreak)
    out = []
    for run in (lambda: select_budget(groups, scores, budget, caps, cost, dense, order,
                                      normalize, tiebreak=tiebreak, round_to=round_to),
                lambda: ref_select_budget(groups, scores, budget, caps, cost, dense,
                                          ref_order, round_to)):
        try:
            out.append(run())
        except BudgetError:
            out.append("unreachable")
    return out


def _prunable(name):
    _, _, groups = analysed(name)
    return [g for g in groups.values() if g.prunable]


# -------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", FIXTURES)
def test_spans_of_equals_member_spans(name):
    groups = _prunable(name)
    assert [spans_of(g) for g in groups] == [member_spans(g) for g in groups]


def test_fixtures_exercise_spans_and_unit_steps():
    """The equivalence tests below mean something: some groups have member spans, some
    a channel wider than one index (heads)."""
    groups = [g for name in FIXTURES for g in _prunable(name)]
    assert any(member_spans(g) for g in groups)
    assert any(unit_step(g, 8) < 8 for g in groups)


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("normalize", ["mean", "max", None])
def test_global_order_equals_reference(name, normalize):
    rng = random.Random(sum(map(ord, name)) + len(str(normalize)))
    groups = _prunable(name)
    for tied, with_tb in [(True, True), (True, False), (False, False)]:
        scores = _scores(rng, groups, tied)
        tb = _scores(rng, groups, True) if with_tb else None
        caps = removable_counts(groups, rng.choice([0.3, 0.9]))
        assert (global_order(groups, scores, caps, normalize, tiebreak=tb)
                == ref_global_order(groups, scores, caps, normalize, tb))


@pytest.mark.parametrize("name", FIXTURES)
def test_select_budget_equals_reference(name):
    rng = random.Random(sum(map(ord, name)))
    groups = _prunable(name)
    sizes = {g.id: g.size for g in groups}
    for trial in range(12):
        caps = removable_counts(groups, rng.choice([0.0, 0.5, 0.9, 0.99]))
        scores = _scores(rng, groups, tied=trial % 2 == 0)
        tiebreak = _scores(rng, groups, tied=True) if trial % 4 == 0 else None
        normalize = rng.choice(["mean", "max", None])
        order = ref_global_order(groups, scores, caps, normalize) if trial % 4 == 3 else None
        cost = _cost(sizes, monotone=trial % 3 != 2)
        dense = cost({gid: list(range(n)) for gid, n in sizes.items()})
        budget = Budget("flops", rng.uniform(0.3, 0.97))
        round_to = rng.choice([1, 1, 2, 4, 8])
        new, ref = _both(groups, scores, budget, caps, cost, dense, order, round_to,
                         normalize, tiebreak)
        assert new == ref, (name, trial)


@pytest.mark.parametrize("name", ["tiny_densenet", "tiny_split", "tiny_vit"])
def test_given_orders_with_repeats_and_any_channel_order(name):
    """Orders a criterion or gradual pruning passes: any channel order, repeats, a
    group's entries beyond its cap."""
    rng = random.Random(7)
    groups = _prunable(name)
    sizes = {g.id: g.size for g in groups}
    for trial in range(8):
        caps = removable_counts(groups, 0.99)
        order = [(g.id, rng.randrange(g.size)) for g in groups for _ in range(g.size + 3)]
        rng.shuffle(order)
        cost = _cost(sizes, monotone=trial % 2 == 0)
        dense = cost({gid: list(range(n)) for gid, n in sizes.items()})
        new, ref = _both(groups, None, Budget("params", rng.uniform(0.1, 0.9)), caps, cost,
                         dense, order, rng.choice([1, 4]))
        assert new == ref, trial


def test_guard_keeps_the_last_channel_of_each_span():
    """A group merged from two layers (channels 0-2 and 3-5, one member each) ranked so
    that one layer goes first: the guard keeps its last channel and removes the next."""
    group = Group("cat", 6, [Member("a.weight", 0, [[0], [1], [2], [], [], []]),
                             Member("b.weight", 0, [[], [], [], [0], [1], [2]])])
    order = [("cat", c) for c in (0, 1, 2, 3, 4, 5)]
    cost = lambda kept: float(len(kept["cat"]))
    plan = select_budget([group], None, Budget("flops", 0.5), {"cat": 5}, cost, 6.0, order)
    assert plan == {"cat": [2, 4, 5]}  # 0, 1 go, 2 is a's last, then 3 goes
    assert plan == ref_select_budget([group], None, Budget("flops", 0.5), {"cat": 5}, cost,
                                     6.0, order, 1)


@pytest.mark.parametrize("name", ["tiny_densenet", "tiny_split"])
def test_select_uniform_keeps_every_span(name):
    groups = _prunable(name)
    rng = random.Random(3)
    scores = _scores(rng, groups, tied=True)
    caps = removable_counts(groups, 0.99)
    kept = select_uniform(groups, scores, 0.99, caps)
    for g in groups:
        assert all(set(kept[g.id]) & span for span in member_spans(g)), g.id
        assert len(kept[g.id]) >= g.size - caps[g.id]
