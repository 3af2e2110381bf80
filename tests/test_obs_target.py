"""obs in gradual steps toward the dense layer outputs (``target="dense"``,
fxprune/criteria/obs_target.py), float64.

Oracle: brute-force least squares. For a consumer whose earlier-removed input columns
are zero in the masked weights, and inputs / targets from different (masked / dense)
networks, each kept unit's greedy ``ΔE`` equals the increase of
``min_W Σ‖W x̃ − y‖² + λ‖W − W₀‖²`` over W with the removed columns at 0, found by
solving that problem for every candidate set; the removed units score 0. End to end:
``steps=1`` equals one-shot obs; in gradual steps, the dense targets change the scores
of a masked model and ``target="masked"`` gives the previous (masked-target) ones.
"""
import pytest
import torch
from torch import nn

import fxprune
from fxprune.criteria.obs import obs_layer_scores
from fxprune.errors import CriterionError
from fxprune.passes.lstsq import LayerGram
from test_gradual import batches_for, fixture  # shared test helpers (pytest pythonpath)

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _objective(X, Y, W0, cols, lam):
    """min over W (columns ``cols`` only; the others 0) of ‖X Wᵀ − Y‖² + λ‖W − W₀‖²."""
    Xk, W0k = X[:, cols], W0[:, cols]
    H = Xk.T @ Xk + lam * torch.eye(len(cols), dtype=DT)
    W = torch.linalg.solve(H, (Y.T @ Xk + lam * W0k).T).T
    full = torch.zeros_like(W0)
    full[:, cols] = W
    return float(((X @ full.T - Y) ** 2).sum() + lam * ((full - W0) ** 2).sum())


def _case(seed=0, d_in=7, o=4, n=60, damp=1e-2):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, o).double()
    with torch.no_grad():
        layer.weight.normal_(generator=g)
        layer.bias.normal_(generator=g)
        layer.weight[:, [1, 4]] = 0.0          # removed by earlier steps
    x_masked = torch.randn(n, d_in, generator=g, dtype=DT)
    x_masked[:, 1] = 0.7                      # a masked channel after BN + ReLU: constant
    y_dense = torch.randn(n, o, generator=g, dtype=DT) + x_masked @ torch.randn(d_in, o, generator=g, dtype=DT)
    gram = LayerGram()
    gram.add(layer, x_masked, y_dense)
    units = [torch.tensor([c]) for c in range(d_in)]
    return layer, gram, units, [1, 4], x_masked, y_dense, damp


def test_dense_target_greedy_equals_brute_force_least_squares():
    layer, gram, units, removed, x, y, damp = _case()
    scores = obs_layer_scores(layer, gram, units, damp, removed=removed, scale=1.0)
    X = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], dim=1)   # the bias column
    W0 = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], dim=1)
    lam = damp * float(torch.diagonal(X.T @ X).mean())
    kept = [c for c in range(X.shape[1]) if c not in removed]
    error = _objective(X, y, W0, kept, lam)
    expected, running = torch.zeros(len(units), dtype=DT), 0.0
    remaining = [c for c in range(len(units)) if c not in removed]
    while remaining:  # brute-force greedy: the cheapest removal, re-solved each time
        trials = {c: _objective(X, y, W0, [k for k in kept if k != c], lam) for c in remaining}
        c = min(trials, key=trials.get)
        running = max(running, trials[c] - error)
        expected[c], error = running, trials[c]
        kept.remove(c)
        remaining.remove(c)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-9)
    assert scores[removed].eq(0).all()


def test_dense_target_differs_from_the_masked_target():
    layer, gram, units, removed, *_ = _case(seed=1)
    dense = obs_layer_scores(layer, gram, units, 1e-2, removed=removed, scale=1.0)
    masked = obs_layer_scores(layer, gram, units, 1e-2, scale=1.0)   # W₀ from the weights
    assert not torch.allclose(dense, masked)


def _fixture():
    model, x = fixture("tiny_resnet")
    return model, x, batches_for(x, n=3, classes=10)


def test_one_step_equals_one_shot_obs():
    model, x, data = _fixture()
    kw = dict(example_inputs=x, data=data, flops=0.5, repair="full")
    one = fxprune.compile(model, "obs", steps=1, **kw)   # obs' step ranking (ranking.py)
    shot = fxprune.compile(model, "obs", normalize=None, cost_aware=True, **kw)
    assert (one.plan.meta["normalize"], one.plan.meta["cost_aware"]) == (None, True)
    assert one.plan.kept == shot.plan.kept


def test_gradual_scores_follow_the_target_option(monkeypatch):
    """At a later step (a masked model), target='dense' scores differ from
    target='masked', which equals scoring the masked copy without a reference."""
    from fxprune import api_gradual
    model, x, data = _fixture()
    seen = {"dense": [], "masked": []}
    real = api_gradual.score_analysis
    current = []

    def spy(*args, **kwargs):
        sal = real(*args, **kwargs)
        seen[current[-1]].append({k: v.clone() for k, v in sal.groups.items()})
        return sal

    monkeypatch.setattr(api_gradual, "score_analysis", spy)
    for target in ("dense", "masked"):
        current.append(target)
        fxprune.compile(model, "obs", example_inputs=x, data=data, flops=0.5, steps=3,
                        repair="full", target=target)
    first = [torch.allclose(seen["dense"][0][g], seen["masked"][0][g]) for g in seen["dense"][0]]
    assert all(first)  # step 1 scores the dense model: the targets coincide
    later = [torch.allclose(seen["dense"][-1][g], seen["masked"][-1][g])
             for g in seen["dense"][-1] if g in seen["masked"][-1]]
    assert not all(later)


def test_unknown_target_is_refused():
    model, x, data = _fixture()
    with pytest.raises(CriterionError, match="target='dens'"):
        fxprune.compile(model, "obs", example_inputs=x, data=data, flops=0.5, target="dens")
