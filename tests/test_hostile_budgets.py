"""Unreachable and malformed budgets, interrupts during scoring and errors between
steps: a clear error, and the input model is bit-identical afterwards.
"""
import re

import pytest
import torch
import torch.nn.functional as F

import fxprune
from hostile_models import DATA_CRITERIA, make, batch, Unchanged


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_unreachable_budget_reports_the_best_reachable_ratio(kind):
    model = make()
    x = batch()[0]
    with Unchanged(model):
        with pytest.raises(fxprune.BudgetError, match="best reachable ratio") as err:
            fxprune.compile(model, "l2", example_inputs=x, **{kind: 0.01})
        best = float(re.search(r"best reachable ratio is ([0-9.]+)", str(err.value)).group(1))
        assert 0.01 < best < 1
        res = fxprune.compile(model, "l2", example_inputs=x, **{kind: best + 0.002})
    ratio = res.report.flops_ratio if kind == "flops" else res.report.params_ratio
    assert ratio <= best + 0.002
    assert abs(ratio - best) < 0.01


@pytest.mark.parametrize("budget", [
    {"flops": 0.0}, {"flops": 1.5}, {"flops": float("nan")}, {"params": -1},
    {"flops": 0.5, "params": 0.5}, {}, {"sparsity": 1.0}, {"flops": [0.5, 0.6]},
    {"flops": True}, {"max_layer_sparsity": 1.0, "flops": 0.5},
])
def test_malformed_budgets(budget):
    model = make()
    with Unchanged(model), pytest.raises(fxprune.BudgetError):
        fxprune.compile(model, "l2", example_inputs=batch()[0], **budget)


# ----------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_interrupt_during_scoring_leaves_the_model_intact(criterion):
    model = make().train()
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return F.cross_entropy(out, target)

    with Unchanged(model), pytest.raises(KeyboardInterrupt):
        fxprune.compile(model, criterion, data=[batch(seed=0), batch(seed=1)], flops=0.5,
                        loss_fn=loss_fn, progress=False)


def test_between_steps_errors_and_edits_do_not_reach_the_model():
    model = make()
    x = batch()[0]

    def fine_tune(module, step):  # edits the slim module in place, then fails
        with torch.no_grad():  # (not zero_: step 1 would refuse all-zero l2 scores first)
            for p in module.parameters():
                p.mul_(0.5)
        if step == 1:
            raise RuntimeError("fine-tuning crashed")

    with Unchanged(model):
        with pytest.raises(RuntimeError, match="fine-tuning crashed"):
            fxprune.compile(model, "l2", example_inputs=x, flops=[0.8, 0.6],
                            between_steps=fine_tune)
