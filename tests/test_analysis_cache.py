"""The public analysis API's cache (fxprune/analysis_cache.py, issue 17).

``fxprune.groups`` then ``fxprune.connectivity`` must trace once; repeated calls on an
unchanged model must not trace; any change the analysis depends on (a replaced submodule,
a resized or re-assigned weight, the training flag, a module flag, the input shape, a
newly registered leaf type) must give a fresh analysis equal to an uncached one; the
user's model is never mutated and a caller editing its results never reaches the cache.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import fxprune
from fxprune import analysis_cache
from fxprune.models import create_model, model_input_size
from fxprune.models.fixtures import conv_bn

FIXTURES = ["tiny_resnet", "tiny_densenet", "tiny_split", "tiny_vit"]


@pytest.fixture
def traces(monkeypatch):
    """Clears the cache and counts the traces the cache makes."""
    analysis_cache.clear()
    calls = []
    real = analysis_cache.capture

    def counting(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        return real(*args, **kwargs)
    monkeypatch.setattr(analysis_cache, "capture", counting)
    yield calls
    analysis_cache.clear()


def _model(name: str):
    torch.manual_seed(0)
    model = create_model(name).eval()
    return model, torch.randn(2, *model_input_size(name))


def _dicts(groups):
    return [g.to_dict() for g in groups]


def _table(conn):
    return {(a, b): conn.kind(a, b) for a in conn.layers for b in conn.layers}


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()},
            [id(p) for p in model.parameters()])


def _same_state(a, b) -> bool:
    return (a[1] == b[1] and a[2] == b[2] and a[0].keys() == b[0].keys()
            and all(torch.equal(a[0][k], b[0][k]) for k in a[0]))


@pytest.mark.parametrize("name", [n for n in FIXTURES if n in fxprune.models.list_models()])
def test_one_trace_and_results_equal_uncached(traces, name):
    model, x = _model(name)
    before = _state(model)
    found, conn = fxprune.groups(model, x), fxprune.connectivity(model, x)
    again, conn2 = fxprune.groups(model, x), fxprune.connectivity(model, x)
    assert len(traces) == 1  # one trace for all four calls
    fresh = fxprune.groups(model, x, cache=False)
    fresh_conn = fxprune.connectivity(model, x, cache=False)
    assert _dicts(found) == _dicts(again) == _dicts(fresh)
    assert _table(conn) == _table(conn2) == _table(fresh_conn)
    assert conn.within == fresh_conn.within
    assert _same_state(before, _state(model))  # never mutated


def test_edits_of_returned_results_do_not_reach_the_cache(traces):
    model, x = _model("tiny_resnet")
    first = fxprune.groups(model, x)
    expected = _dicts(fxprune.groups(model, x, cache=False))
    first[0].members[0].index_map[0].append(999)
    first[0].members.pop()
    first[1].size = -1
    first.pop()
    conn = fxprune.connectivity(model, x)
    conn.layers.clear()
    assert _dicts(fxprune.groups(model, x)) == expected
    assert fxprune.connectivity(model, x).layers
    assert len(traces) == 1


def _sizes(groups):
    return {g.id: g.size for g in groups}


def test_replaced_submodule_is_reanalysed(traces):
    model, x = _model("tiny_resnet")
    before = {g.id: g.targets for g in fxprune.groups(model, x)}
    model.layer1.shortcut = conv_bn(8, 8, 1, relu=False)  # Identity -> a projection
    after = fxprune.groups(model, x)
    assert len(traces) == 2
    assert _dicts(after) == _dicts(fxprune.groups(model, x, cache=False))
    assert any("layer1.shortcut.0.weight" in g.targets for g in after)
    assert not any("layer1.shortcut.0.weight" in t for t in before.values())


def test_resized_weight_is_reanalysed(traces):
    model, x = _model("tiny_mlp")
    assert _sizes(fxprune.groups(model, x))["fc1"] == 32
    with torch.no_grad():  # same Parameter objects, new shapes
        model.fc1.weight.data = torch.randn(48, 16)
        model.fc1.bias.data = torch.randn(48)
        model.fc2.weight.data = torch.randn(32, 48)
    assert _sizes(fxprune.groups(model, x))["fc1"] == 48
    assert len(traces) == 2


def test_reassigned_parameter_dtype_and_flags_are_reanalysed(traces):
    model, x = _model("tiny_mlp")
    fxprune.groups(model, x)
    # a new object: the old one is kept alive, so that the new one cannot reuse its id()
    # (a reused id with the same shape, dtype and flags is a correct cache hit, since the
    # analysis reads no values, but then this count would not see the re-analysis)
    old_weight = model.fc2.weight
    model.fc2.weight = nn.Parameter(old_weight.detach().clone())
    fxprune.groups(model, x)
    model.train()
    fxprune.groups(model, x)
    assert model.training  # the user's flag is kept
    model.double()
    fxprune.groups(model, x.double())
    fxprune.groups(model, x[:1].double())  # another input shape
    assert len(traces) == 5
    fxprune.groups(model, x[:1].double())
    assert len(traces) == 5


class Gated(nn.Module):
    """A forward whose graph depends on a plain bool attribute."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)
        self.use_b = False

    def forward(self, x):
        h = self.a(x)
        if self.use_b:
            h = h + self.b(x)
        return self.out(h)


def test_module_flag_and_patched_forward_are_reanalysed(traces, monkeypatch):
    model, x = Gated(), torch.randn(2, 8)
    assert not any("b.weight" in g.targets for g in fxprune.groups(model, x))
    model.use_b = True
    assert any("b.weight" in g.targets for g in fxprune.groups(model, x))
    monkeypatch.setattr(Gated, "forward", lambda self, x: self.out(self.b(x)))
    assert not any("a.weight" in g.targets for g in fxprune.groups(model, x))
    assert len(traces) == 3


class Helped(nn.Module):
    """A forward that calls a helper method of its class."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def body(self, x):
        return self.b(self.a(x).relu())

    def forward(self, x):
        return self.out(self.body(x))


def test_patched_helper_method_is_reanalysed(traces, monkeypatch):
    model, x = Helped(), torch.randn(2, 8)
    assert any("a.weight" in g.targets for g in fxprune.groups(model, x))
    monkeypatch.setattr(Helped, "body", lambda self, x: self.b(x))
    assert not any("a.weight" in g.targets for g in fxprune.groups(model, x))
    assert len(traces) == 2


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).relu()


def test_registering_a_leaf_type_is_reanalysed(traces):
    from fxprune.passes.trace import _LEAF_TYPES, register_leaf
    model, x = nn.Sequential(nn.Linear(8, 8), Opaque(), nn.Linear(8, 2)), torch.randn(2, 8)
    first = fxprune.groups(model, x)
    register_leaf(Opaque)
    try:
        second = fxprune.groups(model, x)
        assert len(traces) == 2
        assert _dicts(second) == _dicts(fxprune.groups(model, x, cache=False))
        assert _dicts(second) != _dicts(first)
    finally:
        _LEAF_TYPES.pop(Opaque)


def test_entries_go_with_their_model_and_are_bounded(traces):
    x = torch.randn(2, 16)
    models = [create_model("tiny_mlp").eval() for _ in range(analysis_cache.MAX_ENTRIES + 2)]
    for m in models:
        fxprune.groups(m, x)
    assert len(analysis_cache._ENTRIES) == analysis_cache.MAX_ENTRIES
    fxprune.groups(models[-1], x)  # the newest is still cached
    assert len(traces) == len(models)
    del models, m
    gc.collect()
    assert len(analysis_cache._ENTRIES) == 0


def test_uncacheable_options_trace_every_time(traces, monkeypatch):
    model, x = _model("tiny_mlp")
    # options that cannot be compared safely (a tensor in concrete_args): no key
    monkeypatch.setattr(analysis_cache, "_options_spec", lambda kwargs: None)
    fxprune.groups(model, x)
    fxprune.groups(model, x)
    assert len(traces) == 2 and len(analysis_cache._ENTRIES) == 0
    fxprune.groups(model, x, cache=False)  # traces outside the cache module
    assert len(traces) == 2 and len(analysis_cache._ENTRIES) == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_fingerprint_and_copies_leave_the_collector_as_they_found_it(enabled):
    """Both run with the collector paused (issue 17); it must come back as it was."""
    model = create_model("tiny_resnet").eval()
    x = torch.randn(1, *model_input_size("tiny_resnet"))
    found = fxprune.groups(model, x)
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        assert analysis_cache.fingerprint(model) == analysis_cache.fingerprint(model)
        assert gc.isenabled() is enabled
        copies = analysis_cache.copy_groups(found)
        assert gc.isenabled() is enabled
        assert [g.id for g in copies] == [g.id for g in found]
        assert all(c is not g for c, g in zip(copies, found))
    finally:
        (gc.enable if was else gc.disable)()
