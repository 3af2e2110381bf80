"""OBA / OBA-exact per-parameter scores against brute-force oracles (design §5.1, §5.2).

Everything runs in float64 on models traced with ``torch.fx.symbolic_trace`` after
``.double().eval()``.
"""
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp

from fxprune.criteria import ScoringContext, get_criterion
from fxprune.criteria.oba import oba_exact_scores, oba_scores
from fxprune.criteria.scoring import make_scoring_copy
from fxprune.models.fixtures import randomize_norms

D = torch.float64


# ----------------------------------------------------------------------------- models
class ResBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.down is None else self.down(x)
        return F.relu(out + short)


class ResCNN(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.block1 = ResBlock(3, 3)
        self.block2 = ResBlock(3, 4, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def vgg19_tiny(classes=4, w=(2, 3, 3, 4, 4)):
    """VGG-19 layout (2-2-4-4-4 convs, 5 max-pools) at tiny width."""
    layers, cin = [], 3
    for stage, reps in enumerate((2, 2, 4, 4, 4)):
        for _ in range(reps):
            layers += [nn.Conv2d(cin, w[stage], 3, padding=1), nn.BatchNorm2d(w[stage]),
                       nn.ReLU(inplace=True)]
            cin = w[stage]
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class Attention(nn.Module):
    """Tokens -> qkv Linear -> heads -> softmax(q kᵀ·s) v -> proj -> mean -> head."""

    def __init__(self, dim=6, heads=1, classes=3, act=None):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)
        self.act = act

    def split(self, t):
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.hd).permute(0, 2, 1, 3)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        p = (q @ k.transpose(-2, -1) * self.hd ** -0.5).softmax(dim=-1)
        o = (p @ v).permute(0, 2, 1, 3).reshape(b, n, d)
        o = self.proj(o)
        if self.act is not None:
            o = self.act(o)
        return self.head((o + x).mean(1))


seeded = randomize_norms


def trace(model):
    return torch.fx.symbolic_trace(model)


def layer_params(model):
    """Names of δθ: weights and biases of Conv/Linear modules."""
    return [f"{mn}.{pn}" for mn, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) for pn, _ in m.named_parameters(
                recurse=False)]


class Flat:
    """Flatten / unflatten the δθ parameters of a model."""

    def __init__(self, model):
        self.model, self.names = model, layer_params(model)
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.vec = torch.cat([self.params[n].reshape(-1) for n in self.names])

    def unflat(self, v):
        out, o = dict(self.params), 0
        for n in self.names:
            k = self.params[n].numel()
            out[n] = v[o:o + k].view_as(self.params[n])
            o += k
        return out

    def __call__(self, v, x):
        buffers = dict(self.model.named_buffers())
        return functional_call(self.model, {**self.unflat(v), **buffers}, (x,))

    def cat(self, scores):
        return torch.cat([scores[n].reshape(-1) for n in self.names])


def functional_hessian_scores(model, x, y, full=True):
    """δθ ⊙ (H_F δθ), H_F = ∇²⟨sg(∂ℓ/∂f), f(θ)⟩ on the flattened δθ vector."""
    fl = Flat(model)
    f0 = fl(fl.vec, x).detach().requires_grad_(True)
    gf = torch.autograd.grad(F.cross_entropy(f0, y), f0)[0]

    def surrogate(v):
        return (gf * fl(v, x)).sum()
    if full:
        hv = torch.autograd.functional.hessian(surrogate, fl.vec, vectorize=True) @ fl.vec
    else:
        hv = torch.autograd.functional.hvp(surrogate, fl.vec, fl.vec)[1]
    return fl, fl.vec * hv


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def data(shape, classes, n=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(*shape, generator=g, dtype=D),),
             torch.randint(0, classes, (shape[0],), generator=g)) for _ in range(n)]


# ----------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("name", ["mlp", "rescnn", "vgg19"])
def test_oba_equals_functional_hessian_on_piecewise_linear_nets(name):
    if name == "mlp":
        model = seeded(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(),
                                     nn.Linear(6, 3)))
        batch = data((4, 5), 3)[0]
    elif name == "rescnn":
        model, batch = seeded(ResCNN()), data((3, 2, 6, 6), 3)[0]
    else:
        model, batch = seeded(vgg19_tiny()), data((2, 3, 32, 32), 4)[0]
    (x,), y = batch
    fl, ref = functional_hessian_scores(model, x, y, full=name == "mlp")
    got = fl.cat(oba_scores(trace(model), [batch]))
    assert ref.abs().max() > 1e-6
    assert rel_err(got, ref) <= 1e-8


def attention_forward(model, x, params):
    """The oracle Attention block written out with ``params``: (logits, activations).
    Shared with test_oba_blocks.py (hand-written references of OBA's surrogate)."""
    def L(n, t):
        return F.linear(t, params[f"{n}.weight"], params[f"{n}.bias"])
    m, (b, n, d) = model, x.shape
    split = lambda t: t.reshape(b, n, m.heads, m.hd).permute(0, 2, 1, 3)  # noqa: E731
    qo, ko, vo = L("q", x), L("k", x), L("v", x)
    q, k, v = split(qo), split(ko), split(vo)
    s = q @ k.transpose(-2, -1)
    p = (s * m.hd ** -0.5).softmax(dim=-1)
    pv = p @ v
    o_in = pv.permute(0, 2, 1, 3).reshape(b, n, d)
    o = L("proj", o_in)
    h_in = (o + x).mean(1)
    out = L("head", h_in)
    return out, {"q_in": x, "k_in": x, "v_in": x, "proj_in": o_in, "head_in": h_in,
                 "q": q, "k": k, "v": v, "p": p, "s": s, "pv": pv,
                 "q_out": qo, "k_out": ko, "v_out": vo, "proj_out": o, "head_out": out}


def _attention_reference(model, x, y, direction=None):
    """OBA's surrogate S written out by hand for the Attention block, along δθ =
    ``direction`` (a flat vector over ``Flat(model)``; default θ)."""
    fl = Flat(model)
    dvec = fl.vec if direction is None else direction
    lin = ["q", "k", "v", "proj", "head"]

    def forward(params):
        return attention_forward(model, x, params)

    def acts(vec):
        return forward(fl.unflat(vec))[1]
    params0 = fl.unflat(fl.vec)
    # g_z: cotangents of the batch-mean loss at the bilinear nodes
    zs = ["s", "pv"] + [f"{n}_out" for n in lin]
    out, inter = forward({k: t.detach().requires_grad_(True) for k, t in params0.items()})
    g = dict(zip(zs, torch.autograd.grad(F.cross_entropy(out, y), [inter[z] for z in zs])))
    # tangents T along δθ at the true primal values
    _, T = jvp(acts, (fl.vec,), (dvec,))
    dparams = fl.unflat(dvec)

    def S(vec):
        A, P = acts(vec), fl.unflat(vec)
        tot = (g["s"] * (A["q"] @ T["k"].transpose(-2, -1).detach()
                         + T["q"].detach() @ A["k"].transpose(-2, -1))).sum()
        tot = tot + (g["pv"] * (A["p"] @ T["v"].detach() + T["p"].detach() @ A["v"])).sum()
        for n in lin:
            dW = dparams[f"{n}.weight"].detach()
            tot = tot + (g[f"{n}_out"] * (F.linear(T[f"{n}_in"].detach(), P[f"{n}.weight"])
                                          + F.linear(A[f"{n}_in"], dW))).sum()
        return tot
    vec = fl.vec.clone().requires_grad_(True)
    hv = torch.autograd.grad(S(vec), vec)[0]
    return fl, dvec * hv


@pytest.mark.parametrize("heads", [1, 2])
def test_oba_attention_matches_hand_written_surrogate(heads):
    model = seeded(Attention(dim=6, heads=heads))
    batch = data((2, 4, 6), 3)[0]
    (x,), y = batch
    fl, ref = _attention_reference(model, x, y)
    got = fl.cat(oba_scores(trace(model), [batch]))
    assert ref.abs().max() > 1e-6
    assert rel_err(got, ref) <= 1e-8


# ----------------------------------------------------------------------------- exact
@pytest.mark.parametrize("name", ["mlp-gelu", "attention", "rescnn"])
def test_oba_exact_equals_full_hessian(name):
    if name == "mlp-gelu":
        model = seeded(nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.LayerNorm(5),
                                     nn.Linear(5, 3)))
        batch = data((3, 4), 3)[0]
    elif name == "attention":
        model, batch = seeded(Attention(dim=4, heads=2, act=nn.GELU())), data((2, 3, 4), 3)[0]
    else:
        model, batch = seeded(ResCNN()), data((2, 2, 5, 5), 3)[0]
    (x,), y = batch
    fl = Flat(model)
    H = torch.autograd.functional.hessian(lambda v: F.cross_entropy(fl(v, x), y), fl.vec,
                                          vectorize=True)
    ref = fl.vec * (H @ fl.vec)
    got = fl.cat(oba_exact_scores(trace(model), [batch]))
    assert rel_err(got, ref) <= 1e-8


def test_oba_differs_from_exact_where_curvature_is_dropped():
    """With GELU/softmax and the loss curvature, H̃ ≠ H: the two criteria must differ."""
    model = seeded(Attention(dim=4, heads=2, act=nn.GELU()))
    batch = data((2, 3, 4), 3)[0]
    gm = trace(model)
    a, e = oba_scores(gm, [batch]), oba_exact_scores(gm, [batch])
    fl = Flat(model)
    assert rel_err(fl.cat(a), fl.cat(e)) > 1e-3


# ----------------------------------------------------------------------------- contract
def test_average_first_order_and_zero_outside_dtheta():
    model = seeded(ResCNN())
    gm = trace(model)
    b1, b2 = data((2, 2, 6, 6), 3, n=2, seed=5)
    s1, s2, s12 = oba_scores(gm, [b1]), oba_scores(gm, [b2]), oba_scores(gm, [b1, b2])
    for n in s12:
        torch.testing.assert_close(s12[n], (s1[n] + s2[n]) / 2, rtol=1e-12, atol=1e-15)
        assert s12[n].dtype == D and s12[n].shape == gm.get_parameter(n).shape
    assert set(s12) == {n for n, _ in model.named_parameters()}
    for n in ("bn.weight", "bn.bias", "block1.bn1.weight"):
        assert torch.count_nonzero(s12[n]) == 0
    fo = oba_scores(gm, [b1], first_order=True)
    (x,), y = b1
    names = layer_params(model)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y),
                                [model.get_parameter(n) for n in names])
    for n, g in zip(names, grads):
        p = model.get_parameter(n).detach()
        torch.testing.assert_close(fo[n], s1[n] + p * g, rtol=1e-10, atol=1e-14)
    fe = oba_exact_scores(gm, [b1], first_order=True)
    se = oba_exact_scores(gm, [b1])
    n, g = names[0], grads[0]
    torch.testing.assert_close(fe[n], se[n] + model.get_parameter(n).detach() * g)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [m.training for m in model.modules()])


def _assert_same(model, snap):
    state, req, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def test_user_model_untouched_and_eval_mode_used():
    model = seeded(ResCNN())
    model.train()                               # user's model is in train mode
    model.block1.conv1.weight.requires_grad_(False)
    snap = _snapshot(model)
    batch = data((2, 2, 6, 6), 3)[0]
    copy = make_scoring_copy(trace(model))
    for crit in ("oba", "oba-exact"):
        get_criterion(crit).score(ScoringContext(module=copy, groups=[], batches=[batch]))
    _assert_same(model, snap)
    # scoring a train-mode GraphModule directly: eval statistics, flags restored
    gm = trace(model)
    gsnap = _snapshot(gm)
    s_train = oba_scores(gm, [batch])
    _assert_same(gm, gsnap)
    ref = seeded(ResCNN())
    ref.load_state_dict(model.state_dict())
    s_eval = oba_scores(trace(ref), [batch])
    for n in s_eval:
        torch.testing.assert_close(s_train[n], s_eval[n], rtol=1e-12, atol=1e-15)


def test_registry_entries():
    for name in ("oba", "oba-exact"):
        crit = get_criterion(name)
        assert crit.needs_data and crit.description and "\n" not in crit.description
    model = seeded(ResCNN())
    batch = data((2, 2, 6, 6), 3)[0]
    ctx = ScoringContext(module=make_scoring_copy(trace(model)), groups=[], batches=[batch],
                         options={"first_order": True})
    got = get_criterion("oba").score(ctx)
    want = oba_scores(trace(model), [batch], first_order=True)
    for n in want:
        torch.testing.assert_close(got[n], want[n])


class InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.a(x))
        r = self.b(h)
        r += h
        r.mul_(r)                               # gating by itself: a bilinear node
        return self.c(F.relu(r, inplace=True))


class OutOfPlaceNet(InplaceNet):
    def forward(self, x):
        h = F.relu(self.a(x))
        r = self.b(h) + h
        return self.c(F.relu(r * r))


def test_inplace_ops_score_like_out_of_place():
    model = seeded(InplaceNet())
    ref_model = seeded(OutOfPlaceNet())
    ref_model.load_state_dict(model.state_dict())
    batch = data((3, 4), 3)[0]
    got, want = oba_scores(trace(model), [batch]), oba_scores(trace(ref_model), [batch])
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-15)


class RuleNet(nn.Module):
    """Exercises every tangent rule (and a fallback: ``add`` with ``alpha``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc4 = nn.Linear(16, 3)
        self.ln, self.bn = nn.LayerNorm(8), nn.BatchNorm1d(8)
        self.gelu, self.sm = nn.GELU(approximate="tanh"), nn.Softmax(dim=-1)

    def forward(self, x):
        h = self.ln(self.fc1(x))
        h = F.layer_norm(h, (8,), self.ln.weight, None, 1e-3) + F.layer_norm(h, (8,))
        a, b = self.gelu(h), F.gelu(self.fc2(h))
        p, q, r = self.sm(a), torch.softmax(b, -1), b.softmax(dim=-1)
        c = torch.cat([p * q, r / 2.0], dim=-1)
        d = torch.add(c[:, :8], c[:, 8:], alpha=2.0) - self.fc3(h).mean(0, keepdim=True)
        e = self.bn(d.reshape(4, 8).transpose(0, 1).transpose(0, 1))
        return self.fc4(torch.cat([e, h.relu()], -1))


def test_tangent_rules_agree_with_forward_ad(monkeypatch):
    import fxprune.criteria.oba_tangents as rules
    model = seeded(RuleNet())
    model.bn.running_var.uniform_(0.5, 2.0)
    batch = data((4, 6), 3)[0]
    gm = trace(model)
    from fxprune.criteria.oba_graph import build_plan
    assert len(build_plan(gm).rules) >= 15
    got = oba_scores(gm, [batch])
    monkeypatch.setattr(rules, "tangent_rule", lambda *a: None)
    assert not build_plan(gm).rules
    want = oba_scores(gm, [batch])
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-14)


class LeafMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)   # an FX leaf

    def forward(self, x):
        h = self.fc(x)
        return self.head(self.mha(h, h, h)[0].mean(1))


def test_opaque_leaf_module_warns_and_scores_zero(caplog):
    model = seeded(LeafMHA())
    with caplog.at_level("WARNING"):
        scores = oba_scores(trace(model), data((2, 5, 4), 3))
    assert "mha" in caplog.text
    assert all(torch.count_nonzero(v) == 0 for n, v in scores.items() if "mha" in n)
    assert torch.count_nonzero(scores["fc.weight"]) > 0


# ----------------------------------------------------------------------------- DDP
WORKER = textwrap.dedent('''
    import torch, torch.distributed as dist, torch.nn as nn
    from fxprune.criteria.oba import oba_scores

    def run(rank, path, out, batches):
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                                world_size=2)
        try:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(3 * 4 * 4, 3)).double().eval()
            gm = torch.fx.symbolic_trace(model)
            scores = oba_scores(gm, [batches[rank]])
            torch.save(scores, f"{out}.{rank}")
        finally:
            dist.destroy_process_group()
''')


def test_data_parallel_gloo_ranks_agree(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    (tmp_path / "oba_ddp_worker.py").write_text(WORKER)
    sys.path.insert(0, str(tmp_path))
    try:
        import oba_ddp_worker
        batches = data((2, 2, 6, 6), 3, n=2, seed=11)
        out = str(tmp_path / "scores")
        mp.spawn(oba_ddp_worker.run, args=(str(tmp_path / "store"), out, batches),
                 nprocs=2, join=True)
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 3)).double().eval()
    want = oba_scores(trace(model), batches)
    r0, r1 = torch.load(out + ".0"), torch.load(out + ".1")
    for n in want:
        assert torch.equal(r0[n], r1[n])
        torch.testing.assert_close(r0[n], want[n], rtol=1e-12, atol=1e-15)
