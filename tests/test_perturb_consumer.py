"""Option ``perturb="consumer"`` of OBA / OBA-exact / SOSP-H / SOSP-I (issue 12, item 2).

δθ is minus θ on the consumer slices of every prunable channel (what the rewrite
removes). Oracles run on the flattened parameter vector of tiny float64 nets (eval mode,
random BN statistics), as in test_oba.py / test_sosp.py: OBA against ``δθ ⊙ H_F δθ`` with
the functional Hessian by double backward (piecewise-linear nets: ReLU, eval-BN, add,
pooling, conv, linear), OBA-exact and SOSP-H against the exact Hessian, SOSP-I against
the Gauss-Newton matrix built from the full output Jacobian.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fxprune
from fxprune.criteria import get_criterion
from fxprune.criteria.oba import oba_scores
from fxprune.criteria.perturb import consumer_delta
from fxprune.errors import CriterionError
from fxprune.models import create_model
from fxprune.models.fixtures import randomize_norms
from fxprune.models.registry import model_input_size
import oba_oracles as oba_t
import sosp_oracles as sosp_t

D = torch.float64
CONSUMER = ("consumer",)
pytestmark = pytest.mark.usefixtures("one_thread")


class Functional(nn.Module):
    """Parameter layers written as F.linear / ``@`` on parameters (OBA's functional
    layers), ReLU in between."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w1 = nn.Parameter(torch.randn(6, 4, generator=g, dtype=D) * 0.6)
        self.b1 = nn.Parameter(torch.randn(6, generator=g, dtype=D) * 0.3)
        self.w2 = nn.Parameter(torch.randn(6, 5, generator=g, dtype=D) * 0.5)
        self.head = nn.Linear(5, 3).double()

    def forward(self, x):
        h = F.relu(F.linear(x, self.w1, self.b1))
        return self.head(F.relu(h @ self.w2))


def _model(name):
    """(model, two batches); ``rescnn`` has BN and residual streams (identity and 1×1)."""
    if name == "rescnn":
        model = randomize_norms(oba_t.ResCNN())
        gen = torch.Generator().manual_seed(3)
        return model, [((torch.randn(3, 2, 6, 6, generator=gen, dtype=D),),
                        torch.randint(0, 3, (3,), generator=gen)) for _ in range(2)]
    if name == "functional":
        return Functional(), oba_t.data((4, 4), 3, n=2)
    if name == "relu-mlp":
        model = randomize_norms(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6),
                                              nn.ReLU(), nn.Linear(6, 3)))
        return model, oba_t.data((4, 5), 3, n=2)
    return sosp_t.make(name)


def _setup(model, batches, **options):
    """Groups, the flat oracle view, and the consumer δθ as a flat vector and per channel."""
    ctx, groups = sosp_t.context(model, batches, perturb="consumer", **options)
    fl = sosp_t.Flat(model)
    ids = [(g, c) for g in groups if g.prunable for c in range(g.size)]
    rows = torch.stack([-fl.structure(g, c, roles=CONSUMER) for g, c in ids])
    return ctx, groups, fl, ids, rows


def _functional_hvp(fl, batch, v):
    """``H_F v`` with ``H_F = ∇²⟨sg(∂ℓ/∂f), f(θ)⟩`` (double backward)."""
    (x,), y = batch
    f0 = fl(fl.vec, x).detach().requires_grad_(True)
    gf = torch.autograd.grad(F.cross_entropy(f0, y), f0)[0]
    return torch.autograd.functional.hvp(lambda w: (gf * fl(w, x)).sum(), fl.vec, v)[1]


def _flat(fl, scores):
    return torch.cat([scores[n].reshape(-1) for n in fl.names])


def _check_channels(got, groups, ids, values):
    """``got[group][c]`` equals ``values[k]`` for structure ``k = (group, c)``."""
    k = 0
    for g in groups:
        if g.prunable:
            assert sosp_t.rel(got[g.id], values[k:k + g.size]) <= 1e-8, g.id
            k += g.size
    assert k == len(ids)


def test_consumer_delta_is_minus_theta_on_every_consumer_column():
    model, batches = _model("res")
    groups = fxprune.groups(model, batches[0][0][0])
    delta = consumer_delta(groups, dict(model.named_parameters()))
    # every input column of a conv / linear that reads a prunable channel; the stem reads
    # the image, norms and biases are never consumers
    assert set(delta) == {f"{n}.weight" for n in ("a1", "a2", "b1", "b2", "sc", "fc")}
    for n, d in delta.items():
        torch.testing.assert_close(d, -model.get_parameter(n).detach(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- OBA
@pytest.mark.parametrize("name", ["relu-mlp", "functional", "chain", "rescnn", "res"])
def test_oba_consumer_equals_functional_hessian(name):
    model, batches = _model(name)
    ctx, groups, fl, ids, rows = _setup(model, batches)
    dvec = rows.sum(0)
    hv = sum(_functional_hvp(fl, b, dvec) for b in batches) / len(batches)
    crit = get_criterion("oba")
    per_param = crit.score(ctx)
    ref = dvec * hv
    assert ref.abs().max() > 1e-6
    assert oba_t.rel_err(_flat(fl, per_param), ref) <= 1e-8
    # the direct entry point with the same δθ, on a plain symbolic trace
    delta = consumer_delta(groups, dict(model.named_parameters()))
    direct = oba_scores(torch.fx.symbolic_trace(model), batches, delta=delta)
    assert oba_t.rel_err(_flat(fl, direct), ref) <= 1e-8
    # channel score: |δθ_c · H_F δθ| over the channel's consumer slices only
    _check_channels(crit.aggregate(groups, per_param, ctx), groups, ids, (rows @ hv).abs())
    # first_order adds δθ ⊙ g (with δθ = -θ: the sign of the removal). On "functional",
    # where every input column of w2 and head is cut, the sum is 0 exactly (f is then
    # (1-t)²-homogeneous along δθ), hence assert_close rather than a relative error
    ctx.options["first_order"] = True
    fo = _flat(fl, crit.score(ctx))
    torch.testing.assert_close(fo, ref + dvec * sosp_t.oracle_grad(fl, batches),
                               rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("heads", [1, 2])
def test_oba_consumer_attention_matches_hand_written_surrogate(heads):
    """Not piecewise linear: S written out by hand (test_oba.py) along the consumer δθ,
    which reaches the attention products through the q/k/v tangents."""
    # an embedding Linear in front makes the residual stream prunable: its consumers are
    # q, k, v and head; the embedding reads the input (no δθ, so no term in S)
    att = oba_t.Attention(dim=6, heads=heads)
    model = randomize_norms(nn.Sequential(nn.Linear(6, 6), att))
    batch = oba_t.data((2, 4, 6), 3)[0]
    (x,), y = batch
    delta = consumer_delta(fxprune.groups(model, x), dict(model.named_parameters()))
    assert {f"1.{n}.weight" for n in ("q", "k", "v", "proj", "head")} == set(delta)
    fl = oba_t.Flat(att)
    dvec = fl.cat({n: delta[f"1.{n}"] if f"1.{n}" in delta else torch.zeros_like(p)
                   for n, p in fl.params.items()})
    _, ref = oba_t.attention_reference(att, model[0](x).detach(), y, direction=dvec)
    got = oba_scores(torch.fx.symbolic_trace(model), [batch], delta=delta)
    assert ref.abs().max() > 1e-6
    assert oba_t.rel_err(fl.cat({n: got[f"1.{n}"] for n in fl.names}), ref) <= 1e-8


@pytest.mark.parametrize("name", ["mlp", "res"])
def test_oba_exact_consumer_equals_full_hessian(name):
    model, batches = _model(name)
    ctx, groups, fl, ids, rows = _setup(model, batches, first_order=True)
    dvec = rows.sum(0)
    H, g = sosp_t.oracle_hessian(fl, batches), sosp_t.oracle_grad(fl, batches)
    crit = get_criterion("oba-exact")
    per_param = crit.score(ctx)
    ref = dvec * (H @ dvec + g)
    assert oba_t.rel_err(_flat(fl, per_param), ref) <= 1e-8
    _check_channels(crit.aggregate(groups, per_param, ctx), groups, ids,
                    (rows @ (H @ dvec + g)).abs())


# ----------------------------------------------------------------------------- SOSP
@pytest.mark.parametrize("name", ["chain", "res", "mlp"])
def test_sosp_h_consumer_equals_brute_force(name):
    model, batches = _model(name)
    ctx, groups, fl, ids, rows = _setup(model, batches)
    crit = get_criterion("sosp-h")
    per_param = crit.score(ctx)
    g, H = sosp_t.oracle_grad(fl, batches), sosp_t.oracle_hessian(fl, batches)
    hs = H @ rows.sum(0)
    ref = (rows @ g).abs() + 0.5 * (rows @ hs).abs()
    assert ref.max() > 1e-6
    _check_channels(crit.aggregate(groups, per_param, ctx), groups, ids, ref)
    # per parameter: δθ⊙g + ½ δθ⊙Hδθ_struc with δθ = -θ
    assert sosp_t.rel(_flat(fl, per_param), -fl.vec * g - 0.5 * fl.vec * hs) <= 1e-8


@pytest.mark.parametrize("name,jacobian", [("chain", "forward"), ("chain", "reverse"),
                                           ("res", "auto")])
def test_sosp_i_consumer_equals_gauss_newton_brute_force(name, jacobian):
    model, batches = _model(name)
    ctx, groups, fl, ids, rows = _setup(model, batches, jacobian=jacobian, chunk=3)
    crit = get_criterion("sosp-i")
    per_param = crit.score(ctx)
    state = ctx.state["sosp"]
    assert state["ids"] == [(g.id, c) for g, c in ids]
    G, g = sosp_t.oracle_gn(fl, batches), sosp_t.oracle_grad(fl, batches)
    M = rows @ G @ rows.T
    assert sosp_t.rel(state["Q"], 0.5 * M.abs() + torch.diag((rows @ g).abs())) <= 1e-8
    assert sosp_t.rel(state["first_s"], rows @ g) <= 1e-8        # signed: δθ_s = -θ_s
    gs = G @ rows.sum(0)
    _check_channels(crit.aggregate(groups, per_param, ctx), groups, ids,
                    (rows @ g).abs() + 0.5 * (rows @ gs).abs())
    order = crit.select(groups, None, ctx, {gr.id: gr.size - 1 for gr in groups if gr.prunable})
    assert len(order) == sum(gr.size - 1 for gr in groups if gr.prunable)


# ----------------------------------------------------------------------------- the point
class Block(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU → pool → fc (the first BN has a shift β)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.c2, self.b2 = nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x)))
        return self.fc(F.relu(self.b2(self.c2(x))).mean((2, 3)))


def test_consumer_cut_is_the_removal_and_scores_differ_from_weights():
    model = randomize_norms(Block().double().eval())
    with torch.no_grad():
        # a positive shift after the BN: with the channel's conv rows at zero it is
        # β - γμ/σ, which the ReLU passes on
        model.b1.running_mean.zero_()
        model.b1.bias.copy_(torch.tensor([0.8, 0.3, 0.5, 1.1], dtype=D))
    gen = torch.Generator().manual_seed(0)
    batches = [((torch.randn(4, 2, 6, 6, generator=gen, dtype=D),),
                torch.randint(0, 3, (4,), generator=gen))]
    x = batches[0][0][0]
    groups = fxprune.groups(model, x)
    gid = next(g.id for g in groups if g.member("c1.weight").role == "producer")
    group = next(g for g in groups if g.id == gid)
    params = dict(model.named_parameters())
    cut = consumer_delta([group], params)
    for c in range(group.size):
        # θ + δθ_c (consumer cut of channel c alone) is the net with that channel removed
        one = {n: d * _channel_mask(group, n, c, d) for n, d in cut.items()}
        moved = {n: p.detach() + one.get(n, 0) for n, p in params.items()}
        hook = model.r1.register_forward_hook(lambda m, i, o, c=c: _zero_channel(o, c))
        removed = model(x)
        hook.remove()
        torch.testing.assert_close(functional_call(model, moved, (x,)), removed)
        # the weight perturbation of OBA (the channel's conv rows and bias) leaves the
        # BN shift through the ReLU: not the removal
        w = {n: p.detach() * (1 - _channel_mask(group, n, c, p, ("producer", "bias")))
             for n, p in params.items()}
        assert (functional_call(model, w, (x,)) - removed).abs().max() > 1e-3
    for name in ("oba", "sosp-h"):
        weights = fxprune.saliency(model, name, data=batches, progress=False).groups[gid]
        consumer = fxprune.saliency(model, name, data=batches, perturb="consumer",
                                    progress=False).groups[gid]
        assert float((weights - consumer).norm() / consumer.norm()) > 0.05, name


def _channel_mask(group, name, c, like, roles=CONSUMER):
    mask = torch.zeros_like(like)
    for m in group.members:
        if m.target == name and m.role in roles:
            mask.movedim(m.dim, 0)[list(m.index_map[c])] = 1
    return mask


def _zero_channel(out, c):
    out = out.clone()
    out[:, c] = 0
    return out


# ----------------------------------------------------------------------------- API
def test_unknown_perturb_value_is_refused():
    model, batches = _model("chain")
    for name in ("oba", "oba-exact", "sosp-h", "sosp-i"):
        with pytest.raises(CriterionError, match="perturb='consumer'"):
            fxprune.saliency(model, name, data=batches, perturb="inputs", progress=False)
    with pytest.raises(TypeError, match="perturb"):      # a near miss of the option name
        fxprune.saliency(model, "oba", data=batches, pertub="consumer", progress=False)


def test_weights_is_the_default():
    model, batches = _model("res")
    for name in ("oba", "sosp-h"):
        a = fxprune.saliency(model, name, data=batches, progress=False).groups
        b = fxprune.saliency(model, name, data=batches, perturb="weights", progress=False).groups
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_oba_consumer_verified_on_a_fixture():
    torch.manual_seed(0)
    model = randomize_norms(create_model("tiny_resnet").double().eval(), 0)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, *model_input_size("tiny_resnet"), generator=gen, dtype=D),
             torch.randint(0, 10, (6,), generator=gen)) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxprune.compile(model, "oba", data=data, flops=0.5, perturb="consumer",
                          progress=False)
    assert res.report.flops_ratio <= 0.5 + 1e-9
    assert res.report.max_rel_error is not None and res.report.max_rel_error < 1e-6
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = data[0][0]
    assert res.module(x).shape == model(x).shape
