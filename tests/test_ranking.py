"""compile's global ranking, ``normalize`` and ``cost_aware`` (fxprune/ranking.py):
"auto" takes the criterion's own ranking where it applies (obs: raw errors per FLOP saved,
one-shot pruning to a cost budget), the plain ranking elsewhere; explicit values win and
are checked before scoring."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.criteria import get_criterion
from fxprune.ranking import PLAIN_RANKING, resolve_ranking

OBS, PLAIN = (None, True), (PLAIN_RANKING["normalize"], PLAIN_RANKING["cost_aware"])


@pytest.mark.parametrize("name,normalize,cost_aware,context,expected", [
    ("obs", "auto", "auto", {}, OBS),
    ("obs", "auto", "auto", dict(steps=4), PLAIN),           # gradual: measured plain
    ("obs", "auto", "auto", dict(sparsity=0.5), PLAIN),      # no cost to divide by
    ("obs", "auto", "auto", dict(uniform=True), PLAIN),
    ("obs", "mean", "auto", {}, ("mean", False)),            # one choice: no mean ÷ cost
    ("obs", "auto", False, {}, PLAIN),
    ("obs", None, "auto", {}, OBS),                          # agrees with obs' ranking
    ("obs", "max", True, {}, ("max", True)),                 # explicit values win
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
    assert (default.plan.meta["normalize"], default.plan.meta["cost_aware"]) == OBS
    plain = fxprune.compile(net, data=data, flops=0.6, normalize="mean", progress=False)
    assert (plain.plan.meta["normalize"], plain.plan.meta["cost_aware"]) == ("mean", False)
    gradual = fxprune.compile(net, data=data, flops=0.6, steps=2, progress=False)
    assert (gradual.plan.meta["normalize"], gradual.plan.meta["cost_aware"]) == PLAIN


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
