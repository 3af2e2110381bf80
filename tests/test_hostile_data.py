"""Hostile calibration data and non-finite values (NaN/inf in the loss, the gradients,
the weights, the outputs; empty, missing and odd batches): each gets a clear
FxpruneError naming the batch, and the input model is bit-identical afterwards.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fxprune
from hostile_models import DATA_CRITERIA, make, batch, Unchanged


# ----------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("criterion", DATA_CRITERIA)
@pytest.mark.parametrize("api", ["compile", "saliency"])
def test_nan_loss_names_the_batch(criterion, api):
    model = make()
    bad = batch(seed=1)
    bad[0][2, 1, 0, 0] = float("nan")
    data = [batch(seed=0), bad, batch(seed=2)]
    with Unchanged(model), pytest.raises(fxprune.DataError, match=r"batch 1\b") as err:
        if api == "compile":
            fxprune.compile(model, criterion, data=data, flops=0.5, progress=False)
        else:
            fxprune.saliency(model, criterion, data=data, progress=False)
    assert "not finite" in str(err.value)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_inf_loss_names_the_batch(criterion):
    model = make()

    def loss_fn(out, target):  # finite on batch 0, +inf on batch 1 (targets == 9)
        loss = F.cross_entropy(out, target.clamp(max=3))
        return loss + math.inf if bool((target == 9).any()) else loss

    data = [batch(seed=0), (batch(seed=1)[0], torch.full((4,), 9))]
    with Unchanged(model), pytest.raises(fxprune.DataError, match=r"batch 1\b"):
        fxprune.compile(model, criterion, data=data, flops=0.5, loss_fn=loss_fn, progress=False)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_nan_gradients_with_finite_loss_name_the_batch(criterion):
    """sqrt at 0 inside the loss: the loss is finite, its gradient is 0 * inf = NaN.
    Before the fix the NaN scores were silently ranked."""
    model = make()

    def loss_fn(out, target):
        loss = F.cross_entropy(out, target % 4)
        if bool((target >= 4).any()):  # batch 2 only
            loss = loss + torch.sqrt(out.sum() * 0.0)
        return loss

    x, _ = batch(seed=3)
    data = [batch(seed=0), batch(seed=1), (x, torch.full((4,), 5))]
    for api in ("compile", "saliency"):
        with Unchanged(model), pytest.raises(fxprune.DataError, match=r"batch 2\b") as err:
            if api == "compile":
                fxprune.compile(model, criterion, data=data, flops=0.5, loss_fn=loss_fn,
                                progress=False)
            else:
                fxprune.saliency(model, criterion, data=data, loss_fn=loss_fn, progress=False)
        assert "gradients" in str(err.value)


def test_nan_weights_data_free_criterion():
    model = make()
    with torch.no_grad():
        model.c2.weight[1, 2, 0, 0] = float("nan")
    with Unchanged(model), pytest.raises(fxprune.FxpruneError, match="c2.weight"):
        fxprune.compile(model, "l2", example_inputs=batch()[0], flops=0.5)


def test_nan_output_fails_verification_instead_of_passing():
    """max() silently dropped NaN, so a NaN output used to 'verify' with error 0."""
    model = make()
    x = batch()[0]
    x[0, 0, 0, 0] = float("nan")
    plan = fxprune.Plan({"c1": [0, 1, 2], "c2": [0, 4]})
    with Unchanged(model), pytest.raises(fxprune.FxpruneError, match="not finite"):
        fxprune.apply_plan(model, plan, x)
    fxprune.apply_plan(model, plan, x, verify=False)  # documented escape hatch


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("criterion", DATA_CRITERIA + ["l2"])
@pytest.mark.parametrize("empty", ["list", "generator", "dataloader"])
def test_empty_data(criterion, empty):
    model = make()
    if empty == "list":
        data = []
    elif empty == "generator":
        data = (b for b in [])
    else:
        ds = torch.utils.data.TensorDataset(torch.zeros(0, 3, 5, 5), torch.zeros(0).long())
        data = torch.utils.data.DataLoader(ds, batch_size=4)
    with Unchanged(model), pytest.raises(fxprune.DataError, match="empty"):
        fxprune.compile(model, criterion, data=data, example_inputs=batch()[0], flops=0.5)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_missing_data_and_bad_batches(criterion):
    model = make()
    with Unchanged(model):
        with pytest.raises(fxprune.DataError, match="needs calibration data"):
            fxprune.compile(model, criterion, example_inputs=batch()[0], flops=0.5)
        with pytest.raises(fxprune.DataError, match="at least one calibration batch"):
            fxprune.compile(model, criterion, data=[batch()], batches=0, flops=0.5)
        with pytest.raises(fxprune.DataError, match=r"batch 1 is a Tensor"):
            fxprune.compile(model, criterion, data=[batch(), batch()[0]], flops=0.5)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_batches_of_different_sizes(criterion):
    """Scores are per-batch means averaged over batches: batches may differ in size,
    and the result is the mean of the single-batch results."""
    model = make()
    data = [batch(4, seed=0), batch(1, seed=1), batch(3, seed=2)]
    with Unchanged(model):
        whole = fxprune.saliency(model, criterion, data=data, progress=False)
        parts = [fxprune.saliency(model, criterion, data=[b], progress=False) for b in data]
        for name, s in whole.parameters.items():
            mean = sum(p.parameters[name] for p in parts) / len(parts)
            torch.testing.assert_close(s, mean, rtol=1e-9, atol=1e-12)
        res = fxprune.compile(model, criterion, data=data, flops=0.6, progress=False)
    assert res.report.max_rel_error <= 1e-6
    assert res.plan.meta["input_shapes"] == [[4, 3, 5, 5]]  # the first batch's inputs
