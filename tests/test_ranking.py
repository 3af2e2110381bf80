"""compile's global ranking, ``normalize`` and ``cost_aware`` (fxprune/ranking.py):
"auto" takes the criterion's own ranking (``Criterion.ranking`` one-shot,
``Criterion.step_ranking`` in gradual steps) where it applies (pruning by the global order to
a cost budget), the plain ranking elsewhere and for criteria that declare none;
explicit values win and are checked before scoring."""
import dataclasses

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.criteria import _REGISTRY, get_criterion, register_criterion
from fxprune.ranking import PLAIN_RANKING, resolve_ranking

OWN, PLAIN = (None, True), (PLAIN_RANKING["normalize"], PLAIN_RANKING["cost_aware"])
STEP = ("max", False)


@pytest.fixture(autouse=True)
def ranked_criterion():
    """``test-ranked``: l2 declaring the knapsack ranking for itself, for these tests."""
    register_criterion(dataclasses.replace(get_criterion("l2"), name="test-ranked", ranking={
        "normalize": None, "cost_aware": True}, step_ranking={"normalize": "max"}),
        overwrite=True)
    yield
    _REGISTRY.pop("test-ranked", None)


@pytest.mark.parametrize("name,normalize,cost_aware,context,expected", [
    ("test-ranked", "auto", "auto", {}, OWN),
    ("test-ranked", "auto", "auto", dict(steps=4), STEP),     # gradual: its step ranking
    ("test-ranked", "auto", True, dict(steps=4), ("mean", True)),  # one choice
    ("l2", "auto", "auto", dict(steps=4), PLAIN),
    ("l2", "auto", True, dict(steps=4), ("mean", True)),      # explicit: per step too
    ("test-ranked", "auto", "auto", dict(sparsity=0.5), PLAIN),  # no cost to divide by
    ("test-ranked", "auto", "auto", dict(uniform=True), PLAIN),
    ("test-ranked", "mean", "auto", {}, ("mean", False)),    # one choice: no mean ÷ cost
    ("test-ranked", "auto", False, {}, PLAIN),
    ("test-ranked", None, "auto", {}, OWN),                  # agrees with its ranking
    ("test-ranked", "max", True, {}, ("max", True)),         # explicit values win
    ("obs", "auto", "auto", {}, PLAIN),                      # built-ins: plain one-shot
    ("obs", "auto", "auto", dict(steps=4), (None, True)),    # obs' step ranking
    ("obs", "mean", "auto", dict(steps=4), ("mean", False)),
    ("l2", "auto", "auto", {}, PLAIN),
    ("l2", "auto", True, {}, ("mean", True)),
    ("sosp-i", "auto", "auto", {}, PLAIN),
])
def test_auto_resolves_per_criterion_and_context(name, normalize, cost_aware, context,
                                                 expected):
    assert resolve_ranking(get_criterion(name), normalize, cost_aware, **context) == expected


def _net_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                        nn.Linear(12, 3)).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
            for _ in range(3)]
    return net, data


def test_compile_records_the_ranking_it_used():
    net, data = _net_and_data()
    default = fxprune.compile(net, data=data, flops=0.6, progress=False)
    assert default.plan.meta["criterion"] == "obs"
    assert (default.plan.meta["normalize"], default.plan.meta["cost_aware"]) == PLAIN
    own = fxprune.compile(net, "test-ranked", example_inputs=data[0][0], flops=0.6)
    assert (own.plan.meta["normalize"], own.plan.meta["cost_aware"]) == OWN
    plain = fxprune.compile(net, "test-ranked", example_inputs=data[0][0], flops=0.6,
                            normalize="mean")
    assert (plain.plan.meta["normalize"], plain.plan.meta["cost_aware"]) == ("mean", False)
    gradual = fxprune.compile(net, "test-ranked", example_inputs=data[0][0], flops=0.6,
                              steps=2)
    assert (gradual.plan.meta["normalize"], gradual.plan.meta["cost_aware"]) == STEP


def test_a_bad_normalize_is_refused_before_scoring():
    net, data = _net_and_data()
    with pytest.raises(fxprune.FxpruneError, match="normalize"):
        fxprune.compile(net, data=data, flops=0.6, normalize="median", progress=False)


def test_cli_no_cost_aware_and_normalize_reach_compile(tmp_path, capsys):
    import json
    from fxprune.cli import main
    plan = tmp_path / "p.json"
    for extra, expected in (([], ("mean", False)), (["--no-cost-aware", "--normalize", "none"],
                                                   (None, False))):
        code = main(["prune", "tiny_vgg", "--criterion", "l2", "--flops", "0.5", *extra,
                     "--no-measure-latency", "-q", "--plan", str(plan)])
        assert code == 0, capsys.readouterr().err
        meta = json.loads(plan.read_text())["meta"]
        assert (meta["normalize"], meta["cost_aware"]) == expected


@pytest.mark.parametrize("which, ranking, words", [
    ("step_ranking", {"normalise": None}, "did you mean 'normalize'"),
    ("ranking", {"cost_aware": "yes"}, "True or False"),
    ("step_ranking", {"normalize": "median"}, "must be one of"),
])
def test_a_malformed_declared_ranking_is_refused_at_registration(which, ranking, words):
    with pytest.raises(fxprune.FxpruneError, match="test-bad") as info:
        dataclasses.replace(get_criterion("l2"), name="test-bad", **{which: ranking})
    assert words in str(info.value) and which in str(info.value)
