"""FLOPs from propagated shapes (passes/shape_flops.py, issue 17) equal FlopCounterMode's.

The per-node counts must be exactly those of running each node under FlopCounterMode on
fake tensors (the cost model's definition), for every fixture (convs, grouped and
depthwise convs, linear layers on 2-D and 3-D inputs, attention products, SDPA, concats,
flatten->Linear); unknown nodes are run alone under the counter; shapes recorded for
other inputs give None (the caller then counts by running the graph).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.models import create_model, list_models, model_input_size
from fxprune.passes.count import _FlopInterpreter, _with_fake_inputs, count_flops
from fxprune.passes.shape_flops import graph_flops, node_flops
from fxprune.passes.trace import trace

FIXTURES = [n for n in list_models() if n.startswith("tiny_")]


def _by_running(gm, inputs):
    def run(args):
        interp = _FlopInterpreter(gm)
        with torch.no_grad():
            interp.run(*args)
        return interp.per_node
    return {n.name: f for n, f in _with_fake_inputs(run, inputs).items()}


@pytest.mark.parametrize("name", FIXTURES)
def test_per_node_counts_equal_running_each_node(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, *model_input_size(name))
    gm = trace(model, x)
    got = node_flops(gm, (x,))
    assert got is not None
    assert {n.name: f for n, f in got.items()} == _by_running(gm, (x,))
    assert graph_flops(gm, (x,)) == count_flops(model, (x,)) > 0


class Mixed(nn.Module):
    """A leaf-like user module, SDPA twice on equal shapes, a 3-D linear, a bmm, an
    einsum (no formula: run alone) and a 1-D matmul (no formula)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 48)
        self.inner = nn.MultiheadAttention(16, 2, batch_first=True)
        self.vec = nn.Parameter(torch.randn(16))

    def forward(self, x):
        q, k, v = self.proj(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        b = F.scaled_dot_product_attention(q, k, v)
        h = (a + b).transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)
        h = self.inner(h, h, h, need_weights=False)[0]
        g = torch.bmm(h, h.transpose(1, 2))
        e = torch.einsum("bnc,bmc->bnm", h, h)
        return (g + e).sum() + torch.matmul(h, self.vec).sum()


def test_fallback_nodes_and_memo_equal_running():
    model, x = Mixed().eval(), torch.randn(2, 5, 16)
    gm = trace(model, x)
    got = node_flops(gm, (x,))
    assert got is not None
    assert {n.name: f for n, f in got.items()} == _by_running(gm, (x,))


def test_shapes_of_other_inputs_give_none():
    model = create_model("tiny_resnet").eval()
    x = torch.randn(2, *model_input_size("tiny_resnet"))
    gm = trace(model, x)
    assert node_flops(gm, (x[:1],)) is None
    assert node_flops(gm, (x.double(),)) is None
    assert node_flops(gm, (x, x)) is None


def test_a_module_resized_after_propagation_is_not_counted_from_stale_shapes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    gm = trace(model, x)
    gm.get_submodule("2").weight = nn.Parameter(torch.randn(4, 6, 3, 3))  # stale shapes
    assert node_flops(gm, (x,)) is None  # the caller then runs the graph


def _explicit_attention(q, k, v):
    """SDPA spelt as its two products (counted by FlopCounterMode's matmul formula)."""
    reps = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(reps, -3), v.repeat_interleave(reps, -3)
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


@pytest.mark.parametrize("heads,kv_heads,ev", [(4, 4, 8), (4, 2, 8), (2, 2, 6)])
def test_cpu_attention_is_counted_as_its_two_products(heads, kv_heads, ev):
    # FlopCounterMode has no formula for the CPU flash kernel (it counts 0); ours counts
    # what the matmul spelling (and the CUDA kernels) count, grouped KV heads included
    from fxprune.passes.shape_flops import flop_counter
    q, k = torch.randn(3, heads, 5, 8), torch.randn(3, kv_heads, 7, 8)
    v = torch.randn(3, kv_heads, 7, ev)
    counts = []
    for fn in (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads),
               lambda: _explicit_attention(q, k, v)):
        counter = flop_counter()
        with torch.no_grad(), counter:
            fn()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 3 * heads * 5 * 7 * (8 + ev)


def test_pruned_sdpa_heads_are_costed_as_the_slim_model_counts():
    # timm's ViT uses F.scaled_dot_product_attention; its products now count, so the cost
    # model's prediction must still equal the independent recount of the slim model
    import fxprune
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                              depth=2, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    dense = count_flops(model, (x,))
    res = fxprune.compile(model, criterion="l2", flops=0.6, example_inputs=x)
    assert res.report.flops_ratio == pytest.approx(count_flops(res.module, (x,)) / dense,
                                                   rel=1e-9)
    assert res.report.flops_ratio <= 0.6 + 1e-9
