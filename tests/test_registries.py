"""One registry style (fxprune/registry.py): criteria, channel rules, leaves and models
share one duplicate policy, and a new criterion is one file or one registration."""
import textwrap

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.criteria import Criterion, criterion, get_criterion, register_criterion
from fxprune.errors import CriterionError, DuplicateNameError
from fxprune.passes.rule_table import RULES
from fxprune.passes.trace import register_leaf


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def test_a_taken_name_is_refused_everywhere():
    fxprune.list_criteria()  # the built-ins are registered on first use
    with pytest.raises(DuplicateNameError, match="'l2' is already registered"):
        register_criterion(Criterion("l2", "x", lambda ctx: {}, needs_data=False))
    with pytest.raises(DuplicateNameError, match="already registered"):
        RULES.module(nn.Linear)(lambda ctx: None)
    from fxprune.models.registry import register_model
    with pytest.raises(DuplicateNameError, match="already registered"):
        register_model("tiny_vgg", "x", input_size=(3, 16, 16))(lambda **kw: _net())


def test_the_same_entry_again_is_a_no_op():
    class Opaque(nn.Module):
        def forward(self, x):
            return x
    assert register_leaf(Opaque) is Opaque and register_leaf(Opaque) is Opaque
    rule = RULES.modules[nn.Linear]
    assert RULES.module(nn.Linear)(rule) is rule


def test_a_registered_criterion_runs_through_compile():
    @criterion("test-abs-weight", "sum |w| per channel (test)", needs_data=False)
    def score(ctx):
        return {n: p.detach().abs() for n, p in ctx.module.named_parameters()}

    try:
        res = fxprune.compile(_net(), "test-abs-weight", example_inputs=torch.randn(2, 4),
                              flops=0.6)
        assert res.plan.meta["criterion"] == "test-abs-weight"
        assert res.report.flops_ratio <= 0.6
    finally:
        from fxprune.criteria import _REGISTRY
        _REGISTRY.pop("test-abs-weight")


def test_a_criterion_file_dropped_into_the_package_is_discovered(tmp_path, monkeypatch):
    import fxprune.criteria as pkg
    (tmp_path / "dropped.py").write_text(textwrap.dedent('''
        from fxprune.criteria import criterion

        @criterion("test-dropped", "a criterion from a dropped-in file", needs_data=False)
        def score(ctx):
            return {n: p.detach().abs() for n, p in ctx.module.named_parameters()}
    '''))
    monkeypatch.setattr(pkg, "__path__", list(pkg.__path__) + [str(tmp_path)])
    monkeypatch.setattr(pkg, "_LOADED", False)
    try:
        assert "test-dropped" in fxprune.list_criteria()
        res = fxprune.compile(_net(), "test-dropped", example_inputs=torch.randn(2, 4),
                              flops=0.6)
        assert res.report.flops_ratio <= 0.6
    finally:
        pkg._REGISTRY.pop("test-dropped", None)
        import sys
        sys.modules.pop("fxprune.criteria.dropped", None)


def test_unknown_criterion_suggests_the_close_name():
    with pytest.raises(CriterionError, match="did you mean 'sosp-h'"):
        get_criterion("sosph")
