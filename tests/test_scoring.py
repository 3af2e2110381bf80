"""The shared scoring infrastructure (fxprune.criteria.scoring, the scoring pass's batch
preparation and the attention lowering)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.criteria import scoring
from fxprune.passes import lower_attention
from fxprune.passes.score import prepare_batches
from fxprune.criteria.oba import oba_exact_scores, oba_scores
from fxprune.errors import DataError, FxpruneError


def test_prepare_batches_forms_and_limits():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    out = prepare_batches(loader)
    assert len(out) == 3 and isinstance(out[0][0], tuple) and out[0][0][0].shape == (4, 3)
    assert len(prepare_batches(loader, batches=2)) == 2
    pairs = [((x, x), y), ([x], y)]
    out = prepare_batches(pairs)
    assert len(out[0][0]) == 2 and isinstance(out[1][0], tuple)


def test_prepare_batches_errors():
    with pytest.raises(DataError, match="empty"):
        prepare_batches([])
    with pytest.raises(DataError, match="calibration data"):
        prepare_batches(None)
    with pytest.raises(DataError, match="batch 0"):
        prepare_batches([torch.randn(3)])
    with pytest.raises(FxpruneError):
        prepare_batches([(torch.randn(2), torch.zeros(2))], batches=0)


def test_default_loss_cast_and_finite():
    out, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    assert torch.equal(scoring.default_loss(out, y), F.cross_entropy(out, y))
    model = nn.Linear(3, 2).double()
    (xi,), yi = scoring.cast_batch(((torch.randn(2, 3),), y), model)
    assert xi.dtype == torch.float64 and yi.dtype == torch.int64
    _, yf = scoring.cast_batch(((torch.randn(2, 3),), torch.rand(2, 2)), model)
    assert yf.dtype == torch.float64
    scoring.check_finite(torch.ones(3), "loss", 0)
    scoring.check_finite(1.5, "loss", 0)
    with pytest.raises(DataError, match="batch 3"):
        scoring.check_finite(torch.tensor([1.0, float("nan")]), "the loss", 3)
    with pytest.raises(DataError, match="batch 1"):
        scoring.check_finite(float("inf"), "the loss", 1)


def test_all_reduce_sums_without_process_group_is_identity():
    sums = {"a": torch.ones(3)}
    got, count = scoring.all_reduce_sums(sums, 4)
    assert got is sums and count == 4 and torch.equal(got["a"], torch.ones(3))


def test_progress_iter_passthrough_when_disabled_or_not_tty():
    items = [1, 2, 3]
    assert scoring.progress_iter(items, False, "x") is items
    assert list(scoring.progress_iter(items, True, "x")) == items


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("dtype,want", [(torch.float16, torch.float32),
                                        (torch.bfloat16, torch.float32),
                                        (torch.float64, torch.float64)])
def test_make_scoring_copy_dtype_mode_and_original_untouched(dtype, want):
    model = Net().to(dtype).train()
    model.conv.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for traced in (False, True):
        src = torch.fx.symbolic_trace(model) if traced else model
        copy = scoring.make_scoring_copy(src)
        assert not copy.training and not any(m.training for m in copy.modules())
        assert all(p.dtype == want and p.requires_grad for p in copy.parameters())
        assert copy.bn.running_var.dtype == want
        assert copy.bn.num_batches_tracked.dtype == torch.int64
    assert model.training and not model.conv.weight.requires_grad
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])


class Sdpa(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


@pytest.mark.parametrize("kw,mask", [({}, None), ({"is_causal": True}, None),
                                     ({"scale": 0.3}, "float"), ({}, "bool"),
                                     ({"enable_gqa": True}, None)])
def test_lower_sdpa_matches_fused_and_supports_forward_ad(kw, mask):
    torch.manual_seed(0)
    d = torch.float64
    q = torch.randn(2, 4, 5, 8, dtype=d)
    kv_heads = 2 if kw.get("enable_gqa") else 4
    k, v = torch.randn(2, kv_heads, 5, 8, dtype=d), torch.randn(2, kv_heads, 5, 8, dtype=d)
    m = None
    if mask == "float":
        m = torch.randn(5, 5, dtype=d)
    elif mask == "bool":
        m = torch.rand(5, 5) > 0.3
        m[:, 0] = True
    gm = torch.fx.symbolic_trace(Sdpa(**kw))
    want = gm(q, k, v, m)
    assert lower_attention.lower_sdpa(gm) == 1
    assert not any(n.target in lower_attention.SDPA_TARGETS for n in gm.graph.nodes)
    torch.testing.assert_close(gm(q, k, v, m), want)
    tq = torch.randn_like(q)
    _, t = torch.func.jvp(lambda a: gm(a, k, v, m), (q,), (tq,))
    assert torch.isfinite(t).all()
    qq = q.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gm(qq, k, v, m).square().sum(), qq, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), qq)
    assert torch.isfinite(h).all()


def _seeded(model):
    torch.manual_seed(0)
    return model.double().eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    return ((torch.randn(2, 5, 8, generator=g, dtype=torch.float64),),
            torch.randint(0, 3, (2,), generator=g))


class SdpaBlock(nn.Module):
    def __init__(self, dim=8, heads=2, fused=True, causal=False):
        super().__init__()
        self.heads, self.fused, self.causal = heads, fused, causal
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), \
            nn.Linear(dim, 3)

    def forward(self, x, attn_mask=None):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               is_causal=self.causal)
        else:
            s = q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5
            if self.causal:
                s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), -math.inf)
            o = s.softmax(-1) @ v
        o = self.proj(o.transpose(1, 2).reshape(b, n, d))
        return self.head(o.mean(1))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_lowered_matches_explicit_math(causal):
    fused, plain = _seeded(SdpaBlock(causal=causal)), _seeded(SdpaBlock(fused=False,
                                                                       causal=causal))
    plain.load_state_dict(fused.state_dict())
    batch = _batch()
    gm = scoring.make_scoring_copy(torch.fx.symbolic_trace(fused))
    assert not any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    got, want = oba_scores(gm, [batch]), oba_scores(torch.fx.symbolic_trace(plain), [batch])
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-14)
    ex_got = oba_exact_scores(gm, [batch])
    ex_want = oba_exact_scores(torch.fx.symbolic_trace(plain), [batch])
    for n in ex_want:
        torch.testing.assert_close(ex_got[n], ex_want[n], rtol=1e-10, atol=1e-14)


class _MHABlock(nn.Module):
    """nn.MultiheadAttention is a leaf: its fused fast path and SDPA kernel run inside."""

    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.attn = nn.Linear(4, d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc2, self.head = nn.Linear(d, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.fc2(h)).mean(1))


@pytest.mark.parametrize("criterion", ["oba", "oba-exact", "sosp-h"])
def test_leaf_attention_scored_through_math_kernels(criterion):
    """Forward AD / double backward through a leaf nn.MultiheadAttention in eval mode
    (whose fast path and fused SDPA support neither): scored with the math kernels, the
    global switches restored afterwards."""
    torch.manual_seed(0)
    model = _MHABlock().eval()
    x, y = torch.randn(2, 5, 4), torch.randint(0, 3, (2,))
    fast_path = torch.backends.mha.get_fastpath_enabled()
    sal = fxprune.saliency(model, criterion, data=[(x, y)])
    assert all(torch.isfinite(s).all() for s in sal.groups.values())
    assert sal.groups["fc2"].abs().sum() > 0
    assert torch.backends.mha.get_fastpath_enabled() == fast_path
