"""Selection's options (``cost_aware``, ``fill``): the combinations they cannot serve are
refused before any scoring, with what to do; the CLI flags reach compile's plan."""
import json

import pytest
import torch

import fxprune
from fxprune.errors import BudgetError
from fxprune.models.fixtures import TinyVGG

REFUSED = [
    (dict(cost_aware="yes"), "cost_aware", "True, False or 'auto'"),
    (dict(cost_aware=True, criterion="sosp-i"), "cost_aware", "selects channels itself"),
    (dict(cost_aware=True, uniform=True), "cost_aware", "uniform=True"),
    (dict(cost_aware=True, sparsity=0.5, flops=None), "cost_aware", "sparsity budget"),
    (dict(fill="yes"), "fill", "True or False"),
    (dict(fill=True, uniform=True), "fill", "uniform=True"),
    (dict(fill=True, sparsity=0.5, flops=None), "fill", "sparsity budget"),
]


@pytest.mark.parametrize("kwargs, keyword, words", REFUSED)
def test_combinations_it_cannot_serve_are_refused_before_scoring(kwargs, keyword, words,
                                                                 monkeypatch):
    import fxprune.pipeline as stage

    def no_scoring(*args, **kw):
        raise AssertionError("scored before refusing")
    monkeypatch.setattr(stage, "score", no_scoring)
    monkeypatch.setattr(stage, "select_gradually", no_scoring)
    x = torch.randn(2, 3, 16, 16)
    call = dict(criterion="l2", example_inputs=x, flops=0.5, data=[(x, torch.tensor([0, 1]))])
    call.update(kwargs)
    with pytest.raises(BudgetError, match=keyword) as info:
        fxprune.compile(TinyVGG().eval(), **call)
    assert words in str(info.value)


@pytest.mark.parametrize("flag, key", [("--cost-aware", "cost_aware"), ("--fill", "fill")])
def test_cli_flag_reaches_compile(flag, key, tmp_path, capsys):
    from fxprune.cli import main
    plan = tmp_path / "p.json"
    code = main(["prune", "tiny_vgg", "--criterion", "l2", "--flops", "0.5", flag,
                 "--no-measure-latency", "-q", "--plan", str(plan)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(plan.read_text())["meta"][key] is True
