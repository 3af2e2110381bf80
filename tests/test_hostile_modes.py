"""Hostile model modes, dtypes, output structures and untraceable control flow: a
documented behaviour or a clear FxpruneError, and the input model is bit-identical
afterwards.
"""
import pytest
import torch

import fxprune
from hostile_models import (DATA_CRITERIA, Net, Output, DataclassNet, Gate, Gated, make,
                             batch, Unchanged, kwargs_for)


# ----------------------------------------------------------------------------- modes / dtypes
@pytest.mark.parametrize("criterion", DATA_CRITERIA + ["l2"])
def test_train_mode_model_is_scored_in_eval_and_left_in_train(criterion):
    model = make().train()
    model.bn.eval()  # a mixed-mode model: every flag must survive
    data = [batch(seed=0), batch(seed=1)]
    reference = make().eval()
    with Unchanged(model):
        sal = fxprune.saliency(model, criterion, data=data if criterion != "l2" else None,
                               example_inputs=data[0][0], progress=False)
        res = fxprune.compile(model, criterion, flops=0.5, progress=False,
                              **kwargs_for(criterion, data))
    expected = fxprune.saliency(reference, criterion, data=data if criterion != "l2" else None,
                                example_inputs=data[0][0], progress=False)
    for gid, s in expected.groups.items():
        torch.testing.assert_close(sal.groups[gid], s)
    assert model.training and not model.bn.training and model.c1.training
    assert not res.module.training  # the slim module comes back in eval mode
    assert res.report.max_rel_error <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("criterion", DATA_CRITERIA[:1] + ["l2"])
def test_low_precision_models(dtype, criterion):
    """Scored in float32 (a float32 copy of the low-precision weights), slim model
    returned in the model's dtype. Calibration data may stay float32: the example
    inputs taken from it are cast to the model's dtype."""
    model = make(dtype=dtype)
    data = [batch(dtype=torch.float32, seed=0), batch(dtype=torch.float32, seed=1)]
    with Unchanged(model):
        if criterion == "l2":
            res = fxprune.compile(model, criterion, example_inputs=data[0][0].to(dtype),
                                  flops=0.6)
        else:
            res = fxprune.compile(model, criterion, data=data, flops=0.6, progress=False)
        sal = fxprune.saliency(model, criterion, data=data if criterion != "l2" else None,
                               example_inputs=data[0][0].to(dtype), progress=False)
    assert {p.dtype for p in res.module.parameters()} == {dtype}
    assert {b.dtype for b in res.module.buffers() if b.is_floating_point()} == {dtype}
    assert res.report.max_rel_error is not None and res.report.max_rel_error <= 5e-2
    assert res.module(data[0][0].to(dtype)).dtype == dtype
    as32 = fxprune.saliency(model.float(), criterion, data=data if criterion != "l2" else None,
                            example_inputs=data[0][0], progress=False)
    for gid, s in as32.groups.items():
        assert sal.groups[gid].dtype == torch.float32
        torch.testing.assert_close(sal.groups[gid], s, rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        assert sal.parameters[name].dtype == dtype and sal.parameters[name].shape == p.shape


def test_low_precision_model_with_float32_example_inputs_is_a_trace_error():
    model = make(dtype=torch.float16)
    with Unchanged(model), pytest.raises(fxprune.TraceError, match="example_inputs"):
        fxprune.compile(model, "l2", example_inputs=batch(dtype=torch.float32)[0], flops=0.5)


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("out", ["dict", "tuple"])
@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_structured_outputs_need_output_fn(out, criterion):
    model = make(Net(out))
    data = [batch(seed=0), batch(seed=1)]
    with Unchanged(model):
        with pytest.raises(fxprune.DataError, match="output_fn") as err:
            fxprune.compile(model, criterion, data=data, flops=0.6, progress=False)
        assert (("logits" in str(err.value)) if out == "dict" else ("tuple" in str(err.value)))
        pick = (lambda o: o["logits"]) if out == "dict" else (lambda o: o[0])
        res = fxprune.compile(model, criterion, data=data, flops=0.6, output_fn=pick,
                              progress=False)
        # the extra output (features of c2) reaches the model output: never pruned
        assert "c2" not in res.plan.kept
        # data-free criteria need no loss
        fxprune.compile(model, "l2", example_inputs=data[0][0], flops=0.8)
    assert res.report.max_rel_error <= 1e-6
    assert isinstance(res.module(data[0][0]), dict if out == "dict" else tuple)


def test_dataclass_output():
    """A dataclass built in forward is an op without a channel rule: the classifier
    feeding it stays whole (it is never pruned anyway); output_fn picks the logits."""
    model = make(DataclassNet())
    data = [batch(seed=0)]
    with Unchanged(model):
        with pytest.raises(fxprune.DataError, match="a Output"):
            fxprune.compile(model, "oba", data=data, flops=0.6, progress=False)
        res = fxprune.compile(model, "oba", data=data, flops=0.6, progress=False,
                              output_fn=lambda o: o.logits)
    rows = {r.id: r for r in res.report.groups}
    assert not rows["fc"].prunable and "Output" in rows["fc"].reason
    assert isinstance(res.module(data[0][0]), Output)


# ----------------------------------------------------------------------------- tracing
def test_control_flow_on_tensor_values_names_the_module_and_the_fix(caplog):
    """Tracing fails inside ``gate``: it is retried as a leaf (tests/test_leaf_retry.py),
    and the warning names the module and the fix."""
    model = make(Gated())
    x = batch()[0]
    with Unchanged(model):
        with caplog.at_level("WARNING", logger="fxprune.passes.trace"):
            res = fxprune.compile(model, "l2", example_inputs=x, flops=0.6)
        assert "could not trace `gate` (Gate" in caplog.text  # the innermost module, not <root>
        assert "concrete_args" in caplog.text and "torch.where" in caplog.text
        assert any("`gate` (Gate) is kept whole" in n for n in res.report.notes)
        for api in (fxprune.groups, fxprune.connectivity):
            api(model, x)
        explicit = fxprune.compile(model, "l2", example_inputs=x, flops=0.6, leaf_modules=[Gate])
    assert res.report.max_rel_error <= 1e-6 and explicit.report.max_rel_error <= 1e-6
    assert res.plan.kept == explicit.plan.kept
