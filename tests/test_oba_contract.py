"""OBA's contract: batch averaging and the first-order term, zeros outside δθ, the user's
model untouched, the registry entries, in-place ops, the tangent rules against forward
AD, and opaque leaf modules.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.criteria import ScoringContext, get_criterion
from fxprune.criteria.oba import oba_exact_scores, oba_scores
from fxprune.criteria.scoring import make_scoring_copy
from oba_oracles import D, ResCNN, data, layer_params, seeded, trace


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
