"""A new user's mistakes get an ``FxpruneError`` that says what is wrong and what to do,
never a raw ``IndexError`` / ``RuntimeError`` / ``AttributeError`` / ``ValueError`` from
deep inside a criterion or ``torch.load`` (issue 16, "Raw exceptions").

Each test reproduces the raw exception the issue names; the model is unchanged after.
"""
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.models.checkpoint import load_checkpoint

CRITERIA = ["taylor", "oba", "obd"]


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).double()


def data(targets=(0, 1, 2, 3)):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64), torch.tensor(targets))]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.allclose(v, before[k], rtol=0, atol=0, equal_nan=True)
               for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("criterion", CRITERIA)
def test_targets_out_of_range(criterion):
    """cross_entropy's IndexError "Target 30 is out of bounds" became a DataError naming
    the number of classes and the likely cause (labels vs num_classes)."""
    model = net()
    before = state(model)
    with pytest.raises(fxprune.DataError, match=r"4 outputs \(class indices 0\.\.3\)") as err:
        fxprune.compile(model, criterion, data=data((0, 1, 30, 3)), flops=0.7, progress=False)
    assert "num_classes" in str(err.value) and "out of bounds" in str(err.value)
    assert isinstance(err.value.__cause__, IndexError)
    assert unchanged(model, before)


def test_other_index_errors_of_a_loss_fn_are_not_blamed_on_targets():
    """Only cross-entropy's "out of bounds" is about the targets; a loss_fn's own
    indexing bug keeps its own traceback."""
    with pytest.raises(IndexError, match="tuple index out of range"):
        fxprune.compile(net(), "taylor", data=data(), flops=0.7, progress=False,
                        loss_fn=lambda out, t: (out,)[1])


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("loss_fn, match", [
    (lambda out, t: F.cross_entropy(out, t, reduction="none"), r"shape \[4\], not a scalar"),
    (lambda out, t: out, r"shape \[4, 4\], not a scalar"),
    (lambda out, t: 1.0, r"the loss is a float \(1\.0\), not a tensor"),
])
def test_loss_must_be_a_scalar_tensor(criterion, loss_fn, match):
    """A per-sample loss raised RuntimeError ("grad can be implicitly created only for
    scalar outputs"); a Python float raised AttributeError ('float' has no 'detach')."""
    model = net()
    with pytest.raises(fxprune.DataError, match=match) as err:
        fxprune.compile(model, criterion, data=data(), flops=0.7, loss_fn=loss_fn, progress=False)
    assert "loss_fn(outputs, targets)" in str(err.value)
    with pytest.raises(fxprune.DataError, match=match):
        fxprune.saliency(model, criterion, data=data(), loss_fn=loss_fn, progress=False)


def test_one_element_loss_is_accepted():
    """A loss of shape [1] differentiates like a scalar: it is not refused."""
    sal = fxprune.saliency(net(), "taylor", data=data(), progress=False,
                           loss_fn=lambda out, t: F.cross_entropy(out, t).reshape(1))
    assert all(torch.isfinite(s).all() for s in sal.groups.values())


def test_groups_without_example_inputs():
    """groups(model, None) raised a plain ValueError."""
    with pytest.raises(fxprune.DataError, match="example_inputs are required.*torch.randn"):
        fxprune.groups(net(), None)


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("criterion, with_data", [("l2", True), ("l2", False), ("l1", True),
                                                   ("taylor", True), ("oba", True)])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_weights_are_named(criterion, with_data, bad):
    """Inf weights under l2 with data were blamed on "the gradients or curvature on
    calibration batch 0 ... check the loss_fn"; under taylor on "the loss". Now the
    message says the weights themselves are not finite and names the parameter."""
    model = net()
    with torch.no_grad():
        model[2].weight[1, 2, 0, 0] = bad
    before = state(model)
    kw = dict(data=data()) if with_data else dict(example_inputs=data()[0][0])
    with pytest.raises(fxprune.DataError, match=r"weights themselves are not finite") as err:
        fxprune.compile(model, criterion, flops=0.7, progress=False, **kw)
    msg = str(err.value)
    assert "parameter `2.weight`" in msg and "gradients" not in msg and "loss_fn" not in msg
    assert ("1 inf" if bad == float("inf") else "1 NaN") in msg
    assert unchanged(model, before)


def test_minus_inf_mask_buffer_is_not_blamed():
    """An additive -inf mask buffer is deliberate: only parameters (and NaN buffers) are
    named, so a NaN loss from the data is still blamed on the data."""
    model = net()
    model.register_buffer("mask", torch.full((2,), -float("inf")))
    x, y = data()[0]
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(fxprune.DataError, match="batch 0") as err:
        fxprune.compile(model, "taylor", data=[(x, y)], flops=0.7, progress=False)
    assert "weights themselves" not in str(err.value)


# ----------------------------------------------------------------------------- checkpoints
def _write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9])
def test_truncated_checkpoint_says_corrupt(tmp_path, fmt, fraction):
    """A truncated file said "cannot read checkpoint: pop from empty list" (or EOFError,
    "index out of range", "unpack requires a buffer"): now it says the file is corrupt or
    truncated, which format its bytes are, which reader failed, and what to do."""
    full = tmp_path / "full.pt"
    torch.save(net().state_dict(), full, _use_new_zipfile_serialization=fmt == "zip")
    data_ = full.read_bytes()
    cut = _write(tmp_path / "cut.pt", data_[:int(len(data_) * fraction)])
    with pytest.raises(fxprune.CheckpointError) as err:
        load_checkpoint(net(), cut)
    msg = str(err.value)
    assert "corrupt or truncated" in msg and "torch.load(weights_only=True)" in msg
    assert "Re-download it" in msg and "torch.save(model.state_dict(), path)" in msg
    if fraction == 0.0:
        assert "an empty file (0 bytes)" in msg
    else:
        assert ("zip archive" if fmt == "zip" else "legacy torch.save format") in msg


def test_not_a_checkpoint_and_broken_safetensors(tmp_path):
    junk = _write(tmp_path / "junk.pt", b"hello, not a checkpoint at all")
    with pytest.raises(fxprune.CheckpointError, match="neither a zip archive nor a pickle"):
        load_checkpoint(net(), junk)
    bad = _write(tmp_path / "w.safetensors", b"xx")
    with pytest.raises(fxprune.CheckpointError,
                       match="corrupt or truncated. It is 2 bytes long.*safetensors.torch.load_file"):
        load_checkpoint(net(), bad)


def test_safetensors_file_without_its_extension(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net().state_dict().items()}, str(path))
    renamed = _write(tmp_path / "weights.bin", path.read_bytes())
    with pytest.raises(fxprune.CheckpointError, match="safetensors file named without .safetensors.*Rename it to end in .safetensors"):
        load_checkpoint(net(), renamed)


def test_corrupt_pickle_opcode_is_corrupt_not_a_refusal(tmp_path):
    """A garbled pickle stream ("Unsupported operand") is a corrupt file, not a pickled
    Python object that the user could opt in to."""
    bad = _write(tmp_path / "bad.pt", pickle.dumps({"a": 1})[:-3] + b"\x95\x95")
    with pytest.raises(fxprune.CheckpointError, match="corrupt or truncated") as err:
        load_checkpoint(net(), bad)
    assert "allow_pickle" not in str(err.value)


# ----------------------------------------------------------------------------- keyword values
@pytest.mark.parametrize("kw, error, match", [
    (dict(ignore=5), fxprune.UnknownNameError, "give a module name or a list"),  # TypeError
    (dict(batches="2"), fxprune.DataError, "whole number"),                      # TypeError
    (dict(batches=1.5), fxprune.DataError, "whole number"),                      # took 2
    (dict(batches=True), fxprune.DataError, "whole number"),                     # took 1
    (dict(verify="false"), fxprune.FxpruneError, "must be True or False"),       # verified
])
def test_keyword_values_of_the_wrong_type_are_refused(kw, error, match):
    model = net()
    before = state(model)
    with pytest.raises(error, match=match):
        fxprune.compile(model, "taylor", data=data(), flops=0.5, **kw)
    assert unchanged(model, before)


@pytest.mark.parametrize("call", [
    lambda m, x: fxprune.compile(m, "l2", example_inputs=x, flops=0.5),
    lambda m, x: fxprune.groups(m, x),
    lambda m, x: fxprune.connectivity(m, x),
    lambda m, x: fxprune.saliency(m, "l2", example_inputs=x),
    lambda m, x: fxprune.apply_plan(m, fxprune.Plan({"0": [0, 1]}), x),
])
def test_a_model_name_or_class_is_refused_before_it_is_read(call):
    x = data()[0][0]
    with pytest.raises(fxprune.TraceError, match="a model name: build the model first"):
        call("resnet50", x)  # AttributeError: 'str' object has no attribute 'named_modules'
    with pytest.raises(fxprune.TraceError, match="a class: instantiate it"):
        call(nn.Linear, x)


def test_loss_and_leaf_modules_of_the_wrong_type_are_refused():
    with pytest.raises(fxprune.DataError, match="loss_fn=3 must be a function"):
        fxprune.compile(net(), "taylor", data=data(), flops=0.5, loss_fn=3)  # TypeError
    with pytest.raises(fxprune.TraceError, match="give a list of module classes"):
        fxprune.compile(net(), "l2", example_inputs=data()[0][0], flops=0.5,
                        leaf_modules=nn.Conv2d)  # a class, not a list: TypeError
