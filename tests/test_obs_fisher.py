"""``criterion="obs"`` with ``scale="fisher"`` (fxprune/criteria/obs.py), in float64.

Oracles on a tiny conv -> tokens -> linear net with three consumer layers (a conv, a
Linear applied per token, the head):

* the Fisher weights ``F_o`` equal a brute-force per-sample computation (one backward of
  each sample's own loss, ``∂ℓ_n/∂y`` of every consumer output, squared and averaged
  over samples and positions);
* every channel's score equals the brute-force value of its definition: a greedy over
  the layer's input channels where each candidate removal is a ridge re-fit of every
  output unit on the explicit Jacobian of the layer output w.r.t. that unit's weights
  (no Gram matrix, no column map), the error weighted by ``F_o``, the increase
  running-maximised along the greedy order and taken per sample;
* rows sampled into the Gram are rescaled (``R / (N R_H)``): on data whose rows repeat
  the sampled and the unsampled scores agree;
* the Grams and the Fisher come from one forward per batch and no parameter ``.grad``.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.criteria.obs import find_consumers
from fxprune.criteria.obs_stats import accumulate_grams
from fxprune.passes import lstsq
from fxprune.models import create_model
from fxprune.models.fixtures import randomize_norms
from fxprune.models.registry import model_input_size

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
DAMP = 1e-2


class ConvTokens(nn.Module):
    """c1's channels feed conv c2, c2's feed the per-token Linear fc, fc's the head."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
        self.fc, self.head = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        t = torch.tanh(self.fc(h.flatten(2).transpose(1, 2)))      # [B, HW, 5]
        return self.head(t.mean(1))


CONSUMERS = {"c1": "c2", "c2": "fc", "fc": "head"}   # group -> its one consumer


def _setup(seed=0, n_batches=2, n=3):
    torch.manual_seed(seed)
    model = ConvTokens().double().eval()
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(n, 2, 4, 4, generator=g, dtype=DT),
             torch.randint(0, 3, (n,), generator=g)) for _ in range(n_batches)]
    return model, data


def _per_sample_outputs(model, x, t):
    """Inputs, outputs and ``∂ℓ/∂output`` of every consumer for one sample's own loss."""
    rec = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda m, i, o, name=name: rec.__setitem__(name, (i[0].detach(), o)))
        for name in CONSUMERS.values()]
    loss = F.cross_entropy(model(x), t)
    for h in hooks:
        h.remove()
    names = list(rec)
    grads = torch.autograd.grad(loss, [rec[n][1] for n in names])
    return {n: (rec[n][0], g) for n, g in zip(names, grads)}


def _brute_fisher(model, data):
    """``{layer: F_o}``: per sample, squared, summed over positions, averaged over rows."""
    sq, rows = {}, {}
    for x, t in data:
        for k in range(len(x)):
            for name, (_, g) in _per_sample_outputs(model, x[k:k + 1], t[k:k + 1]).items():
                g = g.movedim(1, -1) if g.dim() == 4 else g         # conv: units last
                g = g.reshape(-1, g.shape[-1])
                sq[name] = sq.get(name, 0) + g.pow(2).sum(0)
                rows[name] = rows.get(name, 0) + g.shape[0]
    return {n: sq[n] / rows[n] for n in sq}


def _unit_fn(layer, X, o):
    """Output unit ``o`` of ``layer`` on inputs ``X`` as a function of its weights."""
    shape = layer.weight[o].shape

    def f(theta):
        w, b = theta[:-1].reshape(1, *shape), theta[-1:]
        y = (F.conv2d(X, w, b, padding=layer.padding) if isinstance(layer, nn.Conv2d)
             else F.linear(X, w, b))
        return y.reshape(-1)
    return f


def _brute_scores(layer, X, weights, n_samples):
    """The definition: greedy over input channels of weighted ridge re-fits."""
    n_out, n_in = layer.weight.shape[:2]
    thetas = [torch.cat([layer.weight[o].detach().reshape(-1), layer.bias[o].detach()[None]])
              for o in range(n_out)]
    jac = [torch.autograd.functional.jacobian(_unit_fn(layer, X, o), thetas[o])
           for o in range(n_out)]                                   # exact: y is linear
    targets = [_unit_fn(layer, X, o)(thetas[o]).detach() for o in range(n_out)]
    lam = DAMP * float(jac[0].pow(2).sum(0).mean())                 # λ = damp · mean diag H

    def chan_mask(chans):
        m = torch.zeros(layer.weight[0].shape, dtype=torch.bool)
        m[list(chans)] = True
        return torch.cat([m.reshape(-1), torch.tensor([False])])

    def error(removed):
        gone, total = chan_mask(removed), 0.0
        for o in range(n_out):
            J, th = jac[o][:, ~gone], thetas[o]
            A = torch.cat([J, lam ** 0.5 * torch.eye(J.shape[1], dtype=DT)])
            B = torch.cat([targets[o], lam ** 0.5 * th[~gone]])
            sol = torch.linalg.lstsq(A, B[:, None]).solution
            e = float((A @ sol - B[:, None]).pow(2).sum()) + lam * float(th[gone].pow(2).sum())
            total += float(weights[o]) * e
        return total

    removed, prev, running = [], 0.0, 0.0
    out = torch.zeros(n_in, dtype=DT)
    while len(removed) < n_in:
        cand = [c for c in range(n_in) if c not in removed]
        incs = [error(removed + [c]) - prev for c in cand]
        k = min(range(len(cand)), key=incs.__getitem__)
        running = max(running, incs[k])
        out[cand[k]] = running / n_samples
        removed.append(cand[k])
        prev = error(removed)
    return out


def test_fisher_weights_and_scores_equal_brute_force(monkeypatch):
    monkeypatch.setattr(lstsq, "ROWS_PER_UNKNOWN", 10 ** 6)   # every row in the Gram
    model, data = _setup()
    sal = fxprune.saliency(model, "obs", data=data, scale="fisher", damp=DAMP,
                           progress=False)
    fisher = sal.context.state["obs"]["fisher"]
    brute = _brute_fisher(model, data)
    assert set(fisher) == set(CONSUMERS.values())
    for name, f in fisher.items():
        torch.testing.assert_close(f, brute[name], rtol=1e-9, atol=1e-14)
        assert f.min() < 0.8 * f.max(), name    # the weighting is not uniform
    inputs = {}
    for x, t in data:
        for name, (xin, _) in _per_sample_outputs(model, x, t).items():
            inputs.setdefault(name, []).append(xin)
    n = sum(len(x) for x, _ in data)
    for gid, layer_name in CONSUMERS.items():
        layer = getattr(model, layer_name)
        expected = _brute_scores(layer, torch.cat(inputs[layer_name]), brute[layer_name], n)
        torch.testing.assert_close(sal.groups[gid], expected, rtol=1e-7, atol=1e-12)
    energy = fxprune.saliency(model, "obs", data=data, damp=DAMP, progress=False)
    ratio = sal.groups["c1"] / energy.groups["c1"]
    assert ratio.max() > 1.05 * ratio.min()     # a different score, not a rescaling


class RepeatedTokens(nn.Module):
    """Every sample's tokens are one vector repeated: the fc rows of a sample repeat."""

    def __init__(self):
        super().__init__()
        self.a, self.fc, self.head = nn.Linear(3, 3), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        t = torch.tanh(self.a(x)).unsqueeze(1).expand(-1, 12, -1)   # [B, 12, 3]
        return self.head(torch.tanh(self.fc(t)).mean(1))


@pytest.mark.parametrize("scale", ["fisher", "energy"])
def test_sampled_rows_are_rescaled(monkeypatch, scale):
    torch.manual_seed(1)
    model = RepeatedTokens().double().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(1, 3, generator=g, dtype=DT), torch.randint(0, 2, (1,), generator=g))
            for _ in range(4)]                                        # one sample a batch
    monkeypatch.setattr(lstsq, "ROWS_PER_UNKNOWN", 10 ** 6)
    full = fxprune.saliency(model, "obs", data=data, scale=scale, progress=False)
    monkeypatch.setattr(lstsq, "ROWS_PER_UNKNOWN", 1)            # 4 of fc's 12 rows
    sampled = fxprune.saliency(model, "obs", data=data, scale=scale, progress=False)
    assert sampled.groups["a"].max() > 0
    torch.testing.assert_close(sampled.groups["a"], full.groups["a"], rtol=1e-7, atol=0)


def test_one_forward_per_batch_and_no_parameter_grads():
    model, data = _setup(seed=2)
    groups = fxprune.groups(model, data[0][0])
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    consumers, _ = find_consumers(model, groups)
    grams, fishers, samples = accumulate_grams(model, consumers, data,
                                               loss_fn=F.cross_entropy, fisher=True)
    assert len(calls) == len(data) and samples == 6
    assert all(p.grad is None for p in model.parameters())
    assert set(grams) == set(fishers) == set(CONSUMERS.values())
    assert all(f.sq.shape == (getattr(model, n).weight.shape[0],) for n, f in fishers.items())


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_vit"])
def test_compile_with_fisher_scale(name):
    torch.manual_seed(0)
    model = randomize_norms(create_model(name).double().eval(), 0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, *model_input_size(name), generator=g, dtype=DT),
             torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    res = fxprune.compile(model, "obs", data=data, flops=0.5, scale="fisher", progress=False)
    assert res.report.flops_ratio <= 0.5 + 1e-9
    assert res.report.max_rel_error is not None and res.report.max_rel_error < 1e-6
    energy = fxprune.compile(model, "obs", data=data, flops=0.5, progress=False)
    assert res.plan.kept != energy.plan.kept      # the scale changes the plan here


def test_misspelt_scale_names_the_choices():
    model, data = _setup()
    with pytest.raises(fxprune.FxpruneError, match="'energy'.*'fisher'"):
        fxprune.saliency(model, "obs", data=data, scale="fischer", progress=False)
