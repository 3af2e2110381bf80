"""Tests of the model registry (fxprune.models): every registered net builds, traces and
runs; the CIFAR nets have the papers' parameter counts; spec loaders; checkpoints."""
import argparse
import textwrap

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from safetensors.torch import save_file

from fxprune.errors import CheckpointError, FxpruneError
from fxprune.models import (
    UnknownModelError,
    create_model,
    list_models,
    load_checkpoint,
    model_info,
    model_input_size,
    register_model,
)

EXPECTED = {
    "tiny_mlp", "tiny_vgg", "tiny_resnet", "tiny_bottleneck", "tiny_densenet", "tiny_mobilenet",
    "tiny_se", "tiny_split", "tiny_flatten", "tiny_vit", "tiny_convnext", "tiny_grouped",
    "tiny_attention", "cifar_vgg19", "cifar_resnet20", "cifar_resnet32", "cifar_resnet32_w4",
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_expected_models():
    names = list_models()
    assert EXPECTED <= set(names)
    assert names == sorted(names)
    assert list_models("cifar_resnet*") == ["cifar_resnet20", "cifar_resnet32", "cifar_resnet32_w4"]
    for name in names:
        assert model_info(name)


@pytest.mark.parametrize("name", list_models())
def test_builds_traces_and_runs(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    size = model_input_size(name)
    assert tuple(model.input_size) == size
    x = torch.randn(2, *size)
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        out = gm(x)
        ref = model(x)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name,millions", [
    ("cifar_vgg19", 20.04), ("cifar_resnet32_w4", 7.43), ("cifar_resnet20", 0.27),
    ("cifar_resnet32", 0.47),
])
def test_cifar_param_counts(name, millions):
    assert round(n_params(create_model(name, num_classes=10)) / 1e6, 2) == millions


def test_cifar_kwargs():
    fmnist = create_model("cifar_resnet20", in_chans=1, num_classes=10).eval()
    assert fmnist(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert fmnist.input_size == (1, 32, 32)
    small = create_model("cifar_vgg19", width_mult=0.125, num_classes=100)
    assert small.classifier.in_features == 64
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert create_model("cifar_resnet32_w4", width_mult=0.25).fc.in_features == 64


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_tiny_attention_heads(heads):
    model = create_model("tiny_attention", heads=heads)
    assert model.attn.num_heads == heads and model.attn.head_dim == 16 // heads
    gm = fx.symbolic_trace(model)
    assert gm(torch.randn(3, *model_input_size("tiny_attention"))).shape == (3, 10)


def test_timm_and_torchvision_specs():
    m = create_model("timm:resnet18", num_classes=5).eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    tv = create_model("torchvision:mobilenet_v2", num_classes=5).eval()
    assert tv(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert model_input_size("timm:resnet18") == (3, 224, 224)
    assert model_input_size("torchvision:mobilenet_v2") == (3, 224, 224)
    with pytest.raises(UnknownModelError, match="resnet18"):
        model_input_size("timm:resnet181")
    assert "timm:resnet18" in list_models("timm:resnet1*")
    assert "torchvision:mobilenet_v2" in list_models("torchvision:mobilenet*")


@pytest.mark.parametrize("spec,close", [
    ("tiny_resent", "tiny_resnet"), ("cifar_vgg16", "cifar_vgg19"),
    ("timm:resnet181", "resnet18"), ("torchvision:mobilenetv2", "mobilenet_v2"),
])
def test_unknown_name_suggests_close_match(spec, close):
    with pytest.raises(UnknownModelError, match=close) as info:
        create_model(spec)
    assert isinstance(info.value, FxpruneError)


def test_model_info_unknown():
    with pytest.raises(FxpruneError, match="tiny_mlp"):
        model_info("tiny_mpl")


def test_register_duplicate_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_mlp", "dup", input_size=(1,))(lambda **kw: nn.Identity())


def test_file_factory_spec(tmp_path):
    path = tmp_path / "my_net.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn

        def build(num_classes=10, hidden=8):
            return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    """))
    model = create_model(f"{path}:build", num_classes=3, hidden=5)
    assert model(torch.randn(2, 4)).shape == (2, 3)
    with pytest.raises(UnknownModelError, match="build"):
        create_model(f"{path}:biuld")
    with pytest.raises(UnknownModelError, match="does not exist"):
        create_model(f"{tmp_path / 'nope.py'}:build")


# --------------------------------------------------------------------------- checkpoints

def _fresh_pair(name="tiny_resnet", **kwargs):
    torch.manual_seed(1)
    src = create_model(name, **kwargs)
    with torch.no_grad():  # make buffers non-default too
        for mod in src.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    torch.manual_seed(2)
    return src, create_model(name, **kwargs)


def _assert_same(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "model_ema"])
def test_pth_round_trip(tmp_path, wrap):
    src, dst = _fresh_pair()
    sd = src.state_dict()
    obj = sd if wrap is None else {wrap: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    assert load_checkpoint(dst, str(path)) is dst
    _assert_same(src, dst)


def test_safetensors_and_ddp_prefix(tmp_path):
    src, dst = _fresh_pair()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    load_checkpoint(dst, path)
    _assert_same(src, dst)

    src, dst = _fresh_pair("tiny_vit")
    path = tmp_path / "ddp.pt"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    load_checkpoint(dst, str(path))
    _assert_same(src, dst)


def test_create_model_with_checkpoint(tmp_path):
    src, _ = _fresh_pair("tiny_mlp")
    path = tmp_path / "mlp.pth"
    torch.save(src.state_dict(), path)
    _assert_same(src, create_model("tiny_mlp", checkpoint=str(path)))


def test_mismatch_message(tmp_path):
    src, _ = _fresh_pair("tiny_resnet", num_classes=10)
    sd = src.state_dict()
    del sd["layer1.conv1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    dst = create_model("tiny_resnet", num_classes=5)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, str(path))
    msg = str(info.value)
    assert "layer1.conv1.weight" in msg and "extra.weight" in msg
    assert "head.fc.weight" in msg and "[10, 16]" in msg and "[5, 16]" in msg
    # strict=False ignores key differences but never shape mismatches
    with pytest.raises(CheckpointError, match="head.fc.weight"):
        load_checkpoint(dst, str(path), strict=False)


def test_non_strict_loads_common_keys(tmp_path):
    src, dst = _fresh_pair("tiny_mlp")
    sd = src.state_dict()
    del sd["fc3.bias"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="fc3.bias"):
        load_checkpoint(dst, tmp_path / "partial.pth")
    load_checkpoint(dst, tmp_path / "partial.pth", strict=False)
    torch.testing.assert_close(dst.fc1.weight, src.fc1.weight)


def test_missing_file_and_pickled_objects(tmp_path):
    model = create_model("tiny_mlp")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(model, tmp_path / "absent.pth")
    # a training checkpoint carrying a pickled Python object needs weights_only=False
    path = tmp_path / "train.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(model, path, allow_pickle=False)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):  # refused by default
        load_checkpoint(model, path)
    load_checkpoint(create_model("tiny_mlp"), path, allow_pickle=True)
    torch.save(model, tmp_path / "whole.pt")  # a whole pickled nn.Module
    load_checkpoint(create_model("tiny_mlp"), tmp_path / "whole.pt", allow_pickle=True)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(model, tmp_path / "junk.pth")
