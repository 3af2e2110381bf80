"""Analysis robustness: the user's model is untouched, unknown ops and untraceable code
fail closed with reasons, and every layer of the supported timm/torchvision zoo is
grouped or explained (issue: analysis)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.models import create_model, model_input_size


# --------------------------------------------------------------------------- side effects
@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_vit", "tiny_se"])
def test_model_is_bit_identical_after_analysis(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    model.fc_marker = nn.Identity()  # an attribute the analysis must not touch
    model.get_submodule("head").eval()  # mixed flags are preserved too
    flags = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(2, *model_input_size(name))
    fxprune.groups(model, x)
    fxprune.connectivity(model, x)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state)
    for k, v in after.items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype and v.data_ptr() == ptrs[k], k
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_traced_graph_module_owns_its_tensors():
    """fxprune.passes.trace.trace (what compile/saliency use) copies the weights: writing
    to the GraphModule must not reach the user's model; ties stay tied."""
    from fxprune.passes.trace import trace

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    before = model.a.weight.detach().clone()
    gm = trace(model, torch.randn(2, 4))
    assert gm.a.weight is gm.b.weight
    with torch.no_grad():
        gm.a.weight.zero_()
    assert torch.equal(model.a.weight, before)
    assert model.training and not gm.training


# --------------------------------------------------------------------------- fail closed
class Doubler(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * 2 * self.scale


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.odd = Doubler(16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.odd(self.fc1(x)))))


def test_custom_leaf_module_makes_its_channels_unprunable():
    groups = {g.id: g for g in fxprune.groups(WithLeaf(), torch.randn(2, 8), leaf_modules=[Doubler])}
    assert not groups["fc1"].prunable
    assert "unknown op" in groups["fc1"].reason
    assert "Doubler `odd`" in groups["fc1"].reason and "node `odd`" in groups["fc1"].reason
    assert groups["fc2"].prunable  # untouched neighbours stay prunable


class WithFFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.fft.fft(self.fc1(x)).abs()
        return self.fc3(torch.relu(self.fc2(y)))


def test_unknown_function_makes_its_channels_unprunable():
    groups = {g.id: g for g in fxprune.groups(WithFFT(), torch.randn(2, 8))}
    g = groups["fc1"]
    assert not g.prunable
    assert "unknown op" in g.reason and "fft" in g.reason and "node `fft_fft`" in g.reason
    assert groups["fc2"].prunable


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Branchy()

    def forward(self, x):
        return self.gate(self.fc(x))


class RootBranchy(Untraceable):
    def forward(self, x):
        if x.sum() > 0:  # in the root's own forward: no submodule to keep as a leaf
            return self.fc(x)
        return x


def test_untraceable_model_raises_trace_error_with_advice():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.groups(RootBranchy(), torch.randn(2, 4))
    msg = str(info.value)
    assert "`<root>` (RootBranchy)" in msg
    assert "leaf" in msg and "concrete_args" in msg
    # a failure inside a submodule is retried with it as a leaf: fc's channels are fixed
    groups = {g.id: g for g in fxprune.groups(Untraceable(), torch.randn(2, 4))}
    assert not groups["fc"].prunable and "`gate` (Branchy) is kept whole" in groups["fc"].reason
    groups = {g.id: g for g in fxprune.groups(Untraceable(), torch.randn(2, 4), leaf_modules=[Branchy])}
    assert not groups["fc"].prunable and "Branchy" in groups["fc"].reason


def test_example_inputs_are_required():
    with pytest.raises(fxprune.DataError, match="example_inputs are required"):
        fxprune.groups(create_model("tiny_mlp"), None)


# --------------------------------------------------------------------------- model zoo
ZOO = [f"timm:{n}" for n in (
    "resnet50", "resnext50_32x4d", "vit_base_patch16_224", "deit_small_patch16_224",
    "swin_tiny_patch4_window7_224", "beit_base_patch16_224", "convnext_tiny", "efficientnet_b0",
    "mobilenetv3_large_100", "regnety_016", "densenet121", "mixer_b16_224", "levit_128")] + [
    f"torchvision:{n}" for n in ("resnet50", "vit_b_16", "mobilenet_v2")]
# Models to mark slow if the zoo outgrows the default run: all 16 take ~20 s on 2 idle
# cores (~2.5 min under heavy load), so none is marked today.
ZOO_SLOW: set = set()
_TV_CLASSIFIERS = {"resnet50": "fc", "vit_b_16": "heads.head", "mobilenet_v2": "classifier.1"}
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ZooResult:
    """What the zoo tests need from one analysed model (the model itself is dropped)."""

    def __init__(self, spec: str):
        source, name = spec.split(":")
        torch.manual_seed(0)
        if source == "timm":
            import timm
            model = timm.create_model(name, pretrained=False)
            heads = model.get_classifier()
        else:
            import torchvision
            model = torchvision.models.get_model(name, weights=None)
            heads = model.get_submodule(_TV_CLASSIFIERS[name])
        heads = heads if isinstance(heads, tuple) else (heads,)
        head_ids = {id(m) for h in heads for m in h.modules() if isinstance(m, nn.Linear)}
        self.layers = [n for n, m in model.named_modules() if isinstance(m, _LAYERS)]
        self.classifiers = [n for n, m in model.named_modules() if id(m) in head_ids]
        flags = {n: m.training for n, m in model.named_modules()}
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
        self.groups = fxprune.groups(model, torch.randn(1, 3, 224, 224))
        after = model.state_dict()
        self.changed = [k for k in state if not (torch.equal(after[k], state[k])
                                                  and after[k].data_ptr() == ptrs[k])]
        self.changed += [n for n, m in model.named_modules() if m.training != flags[n]]


@pytest.fixture(scope="module", params=[
    pytest.param(spec, marks=pytest.mark.slow) if spec in ZOO_SLOW else spec for spec in ZOO])
def zoo(request) -> ZooResult:
    """One model of the zoo, built and analysed once for all the tests that read it."""
    return ZooResult(request.param)


def test_zoo_every_layer_is_grouped_or_explained(zoo):
    """Every Conv/Linear output dim belongs to a group (as its producer); a group that is
    not prunable says why; the classifier's outputs are never pruned."""
    owner = {}
    for g in zoo.groups:
        assert g.prunable or g.reason, g.id
        for m in g.members:
            if m.role == "producer" and m.dim == 0:
                owner[m.target] = g
    missing = [layer for layer in zoo.layers if f"{layer}.weight" not in owner]
    assert not missing, f"layers in no group: {missing[:8]}"
    for layer in zoo.classifiers:
        g = owner[f"{layer}.weight"]
        assert not g.prunable and "reaches the model output" in g.reason, (layer, g.reason)
    assert any(g.prunable for g in zoo.groups)


def test_zoo_model_is_unchanged(zoo):
    assert not zoo.changed, f"modified by the analysis: {zoo.changed[:8]}"


# --------------------------------------------------------------------------- functional convs
class _FunctionalGroupedTranspose(nn.Module):
    """conv -> a grouped F.conv_transpose2d called positionally (groups is argument 6,
    dilation 7): its input channels are pruned in whole conv groups."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)   # [C_in, C_out/groups, k, k]

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return F.conv_transpose2d(y, self.weight, None, 1, 1, 0, 2, 1)


def test_functional_conv_transpose_reads_groups_positionally():
    """Reading dilation (argument 7) as groups took this conv for an ungrouped one, and
    the rewrite failed verification; now the grouped transposed conv is named."""
    torch.manual_seed(0)
    model = _FunctionalGroupedTranspose().eval()
    x = torch.randn(2, 3, 8, 8)
    conv = next(g for g in fxprune.groups(model, x) if "conv.weight" in g.targets)
    assert not conv.prunable and "grouped transposed conv" in conv.reason
