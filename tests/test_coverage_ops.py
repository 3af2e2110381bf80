"""Issue 16, coverage: ops that blocked channels for no good reason.

One small model per op (a timm/torchvision model shrunk to a few blocks where the library
allows it); each asserts the channels are now prunable and that ``compile`` verifies
(the masked-equivalence check runs inside ``compile`` and raises on a mismatch). The
full-size timm models of the issue are ``slow``.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxprune
from fxprune.passes.groups import analyze, layers_without_group
from fxprune.passes.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread")


def ready(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval, and weights drawn so that no channel is trivially zero (timm
    zero-initialises layer scales and last norms: the oracle would compare zeros)."""
    torch.manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def groups_of(model, x):
    return {g.id: g for g in fxprune.groups(model, x)}


def prune(model, x, **budget):
    res = fxprune.compile(model, "l2", example_inputs=x, **(budget or {"sparsity": 0.5}))
    assert res.report.max_rel_error <= 1e-6
    return res


def no_reason_mentions(groups, text):
    return not any(text in (g.reason or "") for g in groups.values())


# ------------------------------------------------------------------ 1. stochastic depth
def small_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    cfg = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)]
    return ConvNeXt(cfg, stochastic_depth_prob=0.2, num_classes=10)


def test_stochastic_depth_is_identity_in_eval_convnext_stream_prunable():
    model, x = ready(small_convnext()), torch.randn(1, 3, 32, 32, dtype=torch.float64)
    gm = trace(model, x)
    assert any(n.target is torchvision.ops.stochastic_depth for n in gm.graph.nodes)
    groups = groups_of(model, x)
    assert no_reason_mentions(groups, "stochastic_depth")
    streams = [g for g in groups.values() if g.kind == "stream"]
    assert streams and all(g.prunable for g in streams)
    prune(model, x)


def test_stochastic_depth_leaf_module_passes_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.sd, self.head = torchvision.ops.StochasticDepth(0.3, "row"), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.head(y + self.sd(self.b(y)))

    model, x = ready(Net()), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gm = trace(model, x, leaf_modules=[torchvision.ops.StochasticDepth])
    assert any(n.op == "call_module" and n.target == "sd" for n in gm.graph.nodes)
    groups = {g.id: g for g in analyze(gm).groups}
    assert groups["a"].prunable and groups["a"].kind == "stream"
    res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5,
                          leaf_modules=[torchvision.ops.StochasticDepth])
    assert res.report.max_rel_error <= 1e-6 and len(res.plan.kept["a"]) == 4


# ------------------------------------------------------------------ 2. ScaledStdConv2d
class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.layers import ScaledStdConv2d, StdConv2d
        self.c1 = ScaledStdConv2d(3, 16, 3, padding=1)
        self.c2 = ScaledStdConv2d(16, 12, 3, padding=1)
        self.c3 = StdConv2d(12, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(self.c3(x).mean((2, 3)))


def test_scaled_std_conv_rows_and_columns_prunable():
    model, x = ready(StdNet()), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    groups = groups_of(model, x)
    members = {(m.target, m.dim): m.role for m in groups["c1"].members}
    assert groups["c1"].prunable and groups["c2"].prunable and groups["c3"].prunable
    assert members[("c1.weight", 0)] == "producer" and members[("c2.weight", 1)] == "consumer"
    assert ("c1.gain", 0) in members
    assert layers_without_group(analyze(trace(model, x))) == []
    res = prune(model, x)
    slim = res.module
    assert slim.c1.weight.shape[0] == slim.c1.gain.shape[0] == 8
    assert slim.c2.weight.shape[1] == 8 and slim.c2.gain.shape[0] == 6
    torch.export.export(slim, (x,))


def test_computed_weight_without_rule_is_grouped_with_a_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.c2 = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c2(F.conv2d(x, self.w * 2 + 1))

    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    groups = groups_of(model, x)
    assert not groups["w"].prunable and "computed from `w`" in groups["w"].reason
    assert layers_without_group(analyze(trace(model, x))) == []


@pytest.mark.slow
def test_nf_resnet26_prunes_and_verifies():
    model = ready(timm.create_model("nf_resnet26", num_classes=10), seed=1)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert layers_without_group(analyze(trace(model, x))) == []
    prune(model, x, flops=0.6)


# ------------------------------------------------------------------ 3. selective kernel
class SKNet(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.layers import SelectiveKernel
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.sk = SelectiveKernel(16, 16, kernel_size=[3, 5], split_input=True, rd_divisor=4)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.sk(F.relu(self.stem(x))).mean((2, 3)))


def test_selective_kernel_softmax_over_paths_keeps_channels_prunable():
    model, x = ready(SKNet()), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    groups = groups_of(model, x)
    assert no_reason_mentions(groups, "normalisation across channels")
    paths = next(g for g in groups.values()
                 if any(m.target == "sk.attn.fc_select.weight" for m in g.members))
    assert paths.prunable and paths.size == 16
    fc_select = next(m for m in paths.members if m.target == "sk.attn.fc_select.weight")
    assert all(len(idx) == 2 for idx in fc_select.index_map)  # one row per path
    res = prune(model, x)
    assert res.module.sk.attn.fc_select.weight.shape[0] == 2 * 8


def test_softmax_over_channels_still_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(torch.softmax(self.fc(x), dim=-1))

    groups = groups_of(Net().eval(), torch.randn(2, 4))
    assert not groups["fc"].prunable and "normalisation across channels" in groups["fc"].reason


@pytest.mark.slow
def test_skresnet18_prunes_and_verifies():
    model = ready(timm.create_model("skresnet18", num_classes=10), seed=1)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    groups = groups_of(model, x)
    assert sum(g.size for g in groups.values() if g.prunable) > 0.7 * sum(g.size for g in groups.values())
    prune(model, x, flops=0.6)


# ------------------------------------------------------------------ 4. GroupNorm(1, C)
def small_poolformer():
    from timm.layers import GroupNorm1
    from timm.models.metaformer import MetaFormer
    return MetaFormer(depths=[1, 1], dims=[16, 32], downsample_norm=None, mlp_act=nn.GELU,
                      mlp_bias=True, norm_layers=GroupNorm1, layer_scale_init_values=1e-5,
                      res_scale_init_values=None, use_mlp_head=False, num_classes=10)


def test_poolformer_groupnorm1_streams_prune_like_layernorm():
    model, x = ready(small_poolformer()), torch.randn(1, 3, 32, 32, dtype=torch.float64)
    groups = groups_of(model, x)
    stream = groups["stem.conv"]
    assert (stream.size, stream.kind, stream.prunable) == (16, "stream", True)
    res = prune(model, x)
    norms = [n for n in res.module.graph.nodes if n.target is F.group_norm]
    assert norms and all(n.args[1] == 1 for n in norms)


def test_groupnorm1_module_rewritten_with_one_group():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.gn, self.c2 = nn.Conv2d(3, 8, 3), nn.GroupNorm(1, 8), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c2(self.gn(self.c1(x)))

    model, x = ready(Net()), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert groups_of(model, x)["c1"].prunable
    gn = prune(model, x).module.gn
    assert (gn.num_groups, gn.num_channels, gn.weight.shape[0]) == (1, 4, 4)


# ------------------------------------------------------------------ 5. split reaching the output
class ConcatSplit(nn.Module):
    """Torch-Pruning's tests/test_concat_split.py model: one half of a split goes to the
    output through a residual add, the other half into a concat."""

    def __init__(self, dim: int = 10):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 1), nn.BatchNorm2d(o)]
        self.block1 = nn.Sequential(*block(dim, dim), nn.GELU(), *block(dim, 2 * dim))
        self.parallel_path = nn.Sequential(*block(dim, dim), nn.GELU(), *block(dim, dim))
        self.block2 = nn.Sequential(*block(2 * dim, dim))

    def forward(self, x):
        x3 = self.parallel_path(x)
        x = self.block1(x)
        x1_ch = self.block2[0].in_channels - self.parallel_path[-1].num_features
        x1, x2 = torch.split(x, (x1_ch, self.block1[-1].num_features - x1_ch), 1)
        return self.block2(torch.cat([x1, x3], dim=1)) + x2


def test_split_part_reaching_output_does_not_freeze_the_other():
    model, x = ready(ConcatSplit()), torch.randn(2, 10, 7, 7, dtype=torch.float64)
    groups = groups_of(model, x)
    free, fixed = groups["block1.3"], groups["block1.3#2"]
    assert (free.size, free.prunable) == (10, True)
    assert (fixed.size, fixed.prunable) == (10, False) and "model output" in fixed.reason
    rows = lambda g: sorted(i for m in g.members if m.target == "block1.3.weight"
                            for idx in m.index_map for i in idx)
    assert rows(free) == list(range(10)) and rows(fixed) == list(range(10, 20))
    res = prune(model, x)
    slim = res.module
    assert slim.get_submodule("block1.3").out_channels == 15
    assert slim.get_submodule("block2.0").in_channels == 10


# ------------------------------------------------------------------ 6. LSTM
class RNNNet(nn.Module):
    def __init__(self, kind=nn.LSTM, bidirectional=False):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.rnn = kind(16, 12, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(24 if bidirectional else 12, 3)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.fc1(x)))
        return self.head(y[:, -1])


@pytest.mark.parametrize("kind,bidirectional", [(nn.LSTM, False), (nn.LSTM, True), (nn.GRU, False)])
def test_recurrent_input_features_prunable(kind, bidirectional):
    model, x = ready(RNNNet(kind, bidirectional)), torch.randn(2, 5, 8, dtype=torch.float64)
    g = groups_of(model, x)["fc1"]
    assert g.prunable and g.size == 16
    roles = {(m.target, m.dim): m.role for m in g.members}
    assert roles[("rnn.weight_ih_l0", 1)] == "consumer"
    assert (("rnn.weight_ih_l0_reverse", 1) in roles) == bidirectional
    assert ("rnn.weight_ih_l1", 1) not in roles
    rnn = prune(model, x).module.rnn
    assert rnn.input_size == 8 and rnn.weight_ih_l0.shape[1] == 8 and rnn.hidden_size == 12


# ------------------------------------------------------------------ 7. CaiT talking heads
def test_cait_talking_heads_prune_whole_heads():
    """q·kᵀ heads meet v heads only through proj_l/proj_w (talking heads), so they were
    separate channels and a plan could drop a q/k head but keep its v head: the fused
    qkv reshape [B, N, 3, H, D] then failed on the slim model. A head split must stay
    rectangular: each head is one channel of 3*D rows."""
    model = ready(timm.create_model("cait_xxs24_224", img_size=32, depth=1, depth_token_only=1,
                                    embed_dim=48, num_heads=4, num_classes=10))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    qkv = groups_of(model, x)["blocks.0.attn.qkv"]
    assert (qkv.size, qkv.kind, qkv.prunable) == (4, "head", True)
    rows = next(m for m in qkv.members if m.target == "blocks.0.attn.qkv.weight")
    assert [len(i) for i in rows.index_map] == [3 * 12] * 4
    res = prune(model, x)
    assert res.module.get_submodule("blocks.0.attn.qkv").weight.shape[0] == 3 * 2 * 12


@pytest.mark.slow
def test_cait_xxs24_img96_prunes_and_verifies():
    model = ready(timm.create_model("cait_xxs24_224", img_size=96, num_classes=10), seed=1)
    prune(model, torch.randn(1, 3, 96, 96, dtype=torch.float64), flops=0.6)


def test_a_pooling_subclass_uses_its_base_rule():
    """timm's AvgPool2dSame subclasses AvgPool2d: the spatial rule (found along the MRO)
    must read the base class's rank, not crash on the subclass (maxvit_xlarge_tf_224)."""
    import torch.nn as nn
    import fxprune

    class SamePool(nn.AvgPool2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SamePool(2),
                          nn.Conv2d(8, 4, 1)).eval()
    res = fxprune.compile(model, "l2", example_inputs=torch.randn(1, 3, 8, 8), flops=0.6)
    assert res.report.flops_ratio <= 0.6 and res.report.max_rel_error is not None
