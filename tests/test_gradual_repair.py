"""Repair between gradual steps, ``Gradual(repair=...)``, and the carry pass it rests on."""
import copy
import random

import pytest
import torch

import fxprune
from fxprune.errors import BudgetError, FxpruneError
from fxprune.passes.carry import carry_tensors
from fxprune.passes.gradual import Gradual, step_analysis
from fxprune.passes.groups import analyze
from fxprune.passes.repair import repair
from fxprune.passes.rewrite import rewrite
from fxprune.passes.trace import trace
from fxprune.passes.verify import check, masked_reference

from test_cli_options import _main
from test_gradual import batches_for, fixture

FIXTURES = ["tiny_resnet", "tiny_densenet", "tiny_vit", "tiny_mobilenet", "tiny_grouped"]


def random_plan(dense, seed):
    """A random plan removing about half of every prunable group (one channel kept)."""
    rng = random.Random(seed)
    kept = {}
    for g in dense.groups:
        if g.prunable and g.size > 1:
            kept[g.id] = sorted(rng.sample(range(g.size), max(1, g.size // 2)))
    assert kept, "the fixture has nothing to prune"
    return kept


def perturbed(slim):
    """``slim`` with every floating tensor changed (variances kept positive), as a
    repair changes it: a carry that drops or misplaces any value shows."""
    slim = copy.deepcopy(slim)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in list(slim.named_parameters()) + list(slim.named_buffers()):
            if t.is_floating_point():
                noise = torch.rand(t.shape, generator=gen, dtype=t.dtype)
                t.mul_(0.5 + noise) if "running_var" in name else t.add_(noise - 0.5)
    return slim


@pytest.mark.parametrize("name", FIXTURES)
def test_carried_masked_model_computes_the_slim_model(name):
    """Oracle: the masked reference holding a (changed) slim model's tensors at the kept
    positions computes exactly what that slim model computes."""
    model, x = fixture(name)
    dense = analyze(trace(model, (x,)))
    kept = random_plan(dense, 3)
    slim = perturbed(rewrite(dense, kept))
    target = masked_reference(dense, kept)
    before = {k: v.clone() for k, v in dense.gm.state_dict().items()}
    carry_tensors(dense, slim, kept, target)
    assert check(slim, target, (x,)) < 1e-12
    assert check(rewrite(dense, kept), masked_reference(dense, kept), (x,)) < 1e-12
    for k, v in dense.gm.state_dict().items():     # the dense analysis is read, not written
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_carry_keeps_the_masked_values_at_removed_positions():
    model, x = fixture("tiny_resnet")
    dense = analyze(trace(model, (x,)))
    kept = random_plan(dense, 5)
    target = masked_reference(dense, kept)
    expected = {k: v.clone() for k, v in target.state_dict().items()}
    carry_tensors(dense, rewrite(dense, kept), kept, target)   # unchanged slim: a no-op
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["bn", "full"])
def test_step_model_is_the_repaired_plan(mode):
    """A step with ``repair=mode`` scores what the repair pass makes of the plan so far."""
    model, x = fixture("tiny_resnet")
    dense = analyze(trace(model, (x,)))
    kept = random_plan(dense, 11)
    inputs = [b[0] for b in batches_for(x, n=4, classes=10)]
    step = step_analysis(dense, kept, Gradual(3, repair=mode), inputs)
    slim = rewrite(dense, kept)
    repair(dense.gm, slim, dense, kept, inputs, mode)
    assert check(slim, step.gm, (x,)) < 1e-10
    plain = step_analysis(dense, kept, Gradual(3), inputs).gm
    assert check(slim, plain, (x,)) > 1e-6          # the repair did change something


def test_no_repair_before_anything_is_removed():
    model, x = fixture("tiny_resnet")
    dense = analyze(trace(model, (x,)))
    whole = {g.id: list(range(g.size)) for g in dense.groups if g.prunable}
    step = step_analysis(dense, whole, Gradual(2, repair="full"), inputs=None)
    assert check(step.gm, dense.gm, (x,)) == 0.0


def test_compile_with_repair_between_steps(monkeypatch):
    """compile(steps=Gradual(N, repair=...)) scores repaired plans from the second step on
    and leaves the user's model alone."""
    import fxprune.passes.gradual as gradual_pass
    model, x = fixture("tiny_resnet")
    data = batches_for(x, n=4, classes=10)
    before = copy.deepcopy(model.state_dict())
    scored = []

    def spy(dense, kept, gradual, inputs=None):
        step = step_analysis(dense, kept, gradual, inputs)
        scored.append(check(step.gm, masked_reference(dense, kept), (x,)))
        return step

    monkeypatch.setattr(gradual_pass, "step_analysis", spy)
    res = fxprune.compile(model, "obd", example_inputs=x, data=data, flops=0.5,
                          steps=Gradual(3, repair="full"))
    assert res.report.flops_ratio <= 0.5 + 1e-9
    assert len(scored) == 3 and scored[0] == 0.0 and min(scored[1:]) > 1e-6
    for k, v in model.state_dict().items():      # the user's model is not touched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_repair_between_steps_is_checked_before_any_work():
    model, x = fixture("tiny_resnet")
    with pytest.raises(BudgetError, match="repair='bnn'"):
        Gradual(3, repair="bnn")
    with pytest.raises(FxpruneError, match="pass data="):
        fxprune.compile(model, "l2", example_inputs=x, flops=0.5,
                        steps=Gradual(3, repair="bn"))


CLI = ["prune", "tiny_vgg", "--batches", "2", "--batch-size", "4", "--no-measure-latency",
       "--no-verify", "-q"]


def _cli(capsys, *extra):
    return _main(capsys, *extra, base=CLI)


def test_cli_step_repair_reaches_compile(capsys, monkeypatch):
    seen = {}
    real_compile = fxprune.compile
    monkeypatch.setattr(fxprune, "compile",
                        lambda *a, **k: seen.update(k) or real_compile(*a, **k))
    code, err = _cli(capsys, "--criterion", "obd", "--flops", "0.6", "--steps", "2",
                     "--step-repair", "full")
    assert code == 0, err
    assert seen["steps"] == Gradual(2, repair="full")
    code, err = _cli(capsys, "--criterion", "obd", "--flops", "0.6", "--steps", "2",
                     "--step-repair", "none")
    assert code == 0 and seen["steps"] == Gradual(2, repair=None), err
    code, err = _cli(capsys, "--criterion", "obd", "--flops", "0.6", "--steps", "2")
    assert code == 0 and seen["steps"] == 2, err    # Gradual's default: "auto", as --repair


def test_cli_step_repair_needs_steps_before_the_model_is_built(capsys, monkeypatch):
    from fxprune.cli import prune

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(prune, "load_model", no_model)
    code, err = _cli(capsys, "--flops", "0.6", "--step-repair", "bn")
    assert code == 2 and "add --steps N" in err, err


@pytest.mark.parametrize("final, expected", [("full", "full"), ("bn", "bn"), (None, None)])
def test_auto_step_repair_follows_compiles_repair(monkeypatch, final, expected):
    """``Gradual(N)`` (repair="auto") repairs between steps as compile repairs at the end."""
    import fxprune.api_gradual as api_gradual
    seen = []
    real = api_gradual.prune_gradually

    def spy(dense, groups, budget, gradual, *args, **kwargs):
        seen.append(gradual.repair)
        return real(dense, groups, budget, gradual, *args, **kwargs)

    monkeypatch.setattr(api_gradual, "prune_gradually", spy)
    model, x = fixture("tiny_resnet")
    res = fxprune.compile(model, "obd", example_inputs=x, data=batches_for(x, n=4, classes=10),
                          flops=0.6, steps=2, repair=final)
    assert seen == [expected]
    assert any("repair=" in n for n in res.report.notes) == (expected is not None)


def test_step_repairs_do_not_repeat_the_repair_log(caplog):
    """One repair table per compile (the final repair's), not one per step."""
    model, x = fixture("tiny_resnet")
    with caplog.at_level("INFO", logger="fxprune.passes.repair"):
        fxprune.compile(model, "obd", example_inputs=x, data=batches_for(x, n=4, classes=10),
                        flops=0.5, steps=4)
    tables = [r for r in caplog.records if r.name == "fxprune.passes.repair"
              and r.levelname == "INFO"]
    assert len(tables) == 1, [r.getMessage()[:80] for r in tables]
