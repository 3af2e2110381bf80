"""``criterion="obs"`` (fxprune/criteria/obs.py, passes/obs_solve.py), in float64.

Oracles: the closed-form error increase and compensated weights of removing any subset
of a tiny layer's input channels equal a brute-force least-squares re-fit on the
explicit data (the removed channels sliced out of the layer and its input, so the
channel -> column map is checked too); the greedy block downdates of the inverse equal
recomputing it from scratch; a channel's score sums its consumers' layer scores;
saliency/compile run end to end on a CNN with BN and on a ViT.
"""
import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.criteria.obs import obs_layer_scores
from fxprune.errors import CriterionError
from fxprune.models import create_model
from fxprune.models.fixtures import randomize_norms
from fxprune.models.registry import model_input_size
from fxprune.passes.lstsq import LayerGram, augmented_weight, layer_rows
from fxprune.passes.obs_solve import (consumer_columns, damped_inverse, greedy_removal,
                                      remove_columns, removal_errors)

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _layer_and_data(kind: str, seed: int = 0):
    """A tiny layer with 5 input channels and its input batch (float64)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "linear":
        layer, x = nn.Linear(5, 3), torch.randn(40, 5, generator=g, dtype=DT)
    elif kind == "conv":
        layer, x = nn.Conv2d(5, 3, 2, padding=1), torch.randn(2, 5, 4, 4, generator=g, dtype=DT)
    else:  # conv1d without bias: no constant column to compensate with
        layer, x = nn.Conv1d(5, 3, 3, bias=False), torch.randn(3, 5, 12, generator=g, dtype=DT)
    return layer.double(), x


def _design(layer, x):
    """Explicit design rows with the bias 1 (when the layer has a bias) and targets."""
    with torch.no_grad():
        cols, out = layer_rows(layer, x, layer(x))
    X, Y = cols[0], out[0]
    if layer.bias is not None:
        X = torch.cat([X, torch.ones_like(X[:, :1])], dim=1)
    return X, Y


def _closed_form_inputs(layer, x, damp):
    gram = LayerGram()
    with torch.no_grad():
        gram.add(layer, x, layer(x))
    H, W = gram.H[0], augmented_weight(layer)[0]
    if layer.bias is None:
        H, W = H[:-1, :-1], W[:, :-1]
    lam = damp * float(torch.diagonal(H).mean())
    return H, W, lam, damped_inverse(H, damp)


def _sliced(layer, keep):
    """The layer restricted to input channels ``keep`` (an independent column map)."""
    if isinstance(layer, nn.Linear):
        new = nn.Linear(len(keep), layer.out_features)
    else:
        cls = type(layer)
        new = cls(len(keep), layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, bias=layer.bias is not None)
    new = new.double()
    with torch.no_grad():
        new.weight.copy_(layer.weight[:, keep])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def _brute_force(layer, x, removed, lam):
    """Ridge re-fit of the kept channels toward the dense output:
    ``min ‖W′x̃ − y‖² + λ‖W′ − W‖²`` with the removed columns fixed at 0.
    Returns (the minimum, the re-fitted kept weight in the sliced layer's layout)."""
    keep = [c for c in range(x.shape[1]) if c not in removed]
    _, Y = _design(layer, x)
    if keep:
        small = _sliced(layer, keep)
        Xk, _ = _design(small, x[:, keep])
        Wk = augmented_weight(small)[0]
        if small.bias is None:
            Wk = Wk[:, :-1]
    else:  # every channel removed: only the bias (if any) is left to re-fit
        if layer.bias is None:  # nothing left: the error is the whole output (+ ridge)
            w = layer.weight.detach()
            return float(Y.pow(2).sum()) + lam * float(w.pow(2).sum()), Y.new_zeros(Y.shape[1], 0)
        Xk, Wk = torch.ones(Y.shape[0], 1, dtype=DT), layer.bias.detach().reshape(-1, 1)
    A = torch.cat([Xk, lam ** 0.5 * torch.eye(Xk.shape[1], dtype=DT)])
    B = torch.cat([Y, lam ** 0.5 * Wk.T])
    sol = torch.linalg.lstsq(A, B).solution                   # [d_kept, o]
    removed_w = layer.weight.detach()[:, list(removed)]
    err = float((A @ sol - B).pow(2).sum()) + lam * float(removed_w.pow(2).sum())
    return err, sol.T


@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
@pytest.mark.parametrize("damp", [0.0, 1e-2])
def test_closed_form_equals_brute_force_on_every_subset(kind, damp):
    layer, x = _layer_and_data(kind)
    H, W, lam, Hinv = _closed_form_inputs(layer, x, damp)
    n = layer.weight.shape[1]
    for r in range(1, n + 1):
        for removed in itertools.combinations(range(n), r):
            cols = consumer_columns(layer, removed)
            closed = float(removal_errors(Hinv, W, [cols])[0])
            brute, w_kept = _brute_force(layer, x, removed, lam)
            assert closed == pytest.approx(brute, rel=1e-7, abs=1e-9), removed
            W_new, _ = remove_columns(W, Hinv, cols)
            keep = torch.ones(W.shape[1], dtype=torch.bool)
            keep[cols] = False
            torch.testing.assert_close(W_new[:, keep], w_kept, rtol=1e-7, atol=1e-9)
            assert W_new[:, cols].abs().max() == 0


def _naive_greedy(H, W, units, lam):
    """Greedy removal recomputing ``(H + λI)[K, K]⁻¹`` and the joint optimal weights
    from scratch at every step (no downdates, no stored compensation)."""
    d = H.shape[0]
    Hd = H + lam * torch.eye(d, dtype=DT)
    removed, order, increases, prev = [], [], [], 0.0
    remaining = list(range(len(units)))

    def joint(cols):
        keep = [j for j in range(d) if j not in set(cols)]
        # ΔE of the joint removal: min over the kept columns of δW Hd δWᵀ, δW_M = -W_M
        Wm, Hkm = W[:, cols], Hd[keep][:, cols]
        Hkk = Hd[keep][:, keep]
        dK = -torch.linalg.solve(Hkk, Hkm @ (-Wm).T).T
        full = torch.zeros_like(W)
        full[:, keep], full[:, cols] = dK, -Wm
        return float((full @ Hd * full).sum()), W + full, torch.linalg.inv(Hkk), keep

    while remaining:
        errs = [joint(removed + units[u].tolist())[0] - prev for u in remaining]
        k = min(range(len(errs)), key=errs.__getitem__)
        u = remaining.pop(k)
        order.append(u)
        increases.append(errs[k])
        removed += units[u].tolist()
        prev = joint(removed)[0]
    return order, increases, joint


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_greedy_downdates_equal_recomputing_the_inverse(kind):
    layer, x = _layer_and_data(kind, seed=1)
    H, W, lam, Hinv = _closed_form_inputs(layer, x, 1e-2)
    units = [consumer_columns(layer, [c]) for c in range(layer.weight.shape[1])]
    order, increases = greedy_removal(Hinv, W, units)
    naive_order, naive_inc, joint = _naive_greedy(H, W, units, lam)
    assert order == naive_order
    assert increases == pytest.approx(naive_inc, rel=1e-7, abs=1e-10)
    # step by step: the downdated inverse is the inverse of the kept block, and the
    # compensated weight is the jointly optimal one
    Wc, Hc, removed = W.clone(), Hinv.clone(), []
    for u in order[:-1]:
        Wc, Hc = remove_columns(Wc, Hc, units[u])
        removed += units[u].tolist()
        _, w_joint, inv_kept, keep = joint(removed)
        torch.testing.assert_close(Hc[keep][:, keep], inv_kept, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(Wc, w_joint, rtol=1e-7, atol=1e-10)
        assert Hc[removed].abs().max() == 0 and Hc[:, removed].abs().max() == 0


def test_per_step_removes_the_cheapest_units_together():
    layer, x = _layer_and_data("conv", seed=4)
    _, W, _, Hinv = _closed_form_inputs(layer, x, 1e-2)
    units = [consumer_columns(layer, [c]) for c in range(5)]
    single = removal_errors(Hinv, W, units)
    order, increases = greedy_removal(Hinv, W, units, per_step=5)
    assert order == torch.argsort(single, stable=True).tolist()
    assert increases == pytest.approx(single[order].tolist())
    order2, inc2 = greedy_removal(Hinv, W, units, per_step=2)
    assert order2[:2] == order[:2] and inc2[:2] == pytest.approx(increases[:2])
    W2, H2 = remove_columns(W, Hinv, torch.cat([units[u] for u in order2[:2]]))
    rest = [u for u in range(5) if u not in order2[:2]]
    assert inc2[2:4] == pytest.approx(sorted(removal_errors(H2, W2, [units[u] for u in rest])
                                             .tolist())[:2])


def test_layer_scores_are_normalised_running_maxima():
    layer, x = _layer_and_data("linear", seed=2)
    gram = LayerGram()
    with torch.no_grad():
        gram.add(layer, x, layer(x))
    _, W, _, Hinv = _closed_form_inputs(layer, x, 1e-2)
    units = [consumer_columns(layer, [c]) for c in range(5)]
    order, increases = greedy_removal(Hinv, W, units)
    scores = obs_layer_scores(layer, gram, units, 1e-2)
    running = torch.tensor(increases, dtype=DT).cummax(0).values / gram.yy
    torch.testing.assert_close(scores[order], running)
    assert gram.yy == pytest.approx(float(layer(x).detach().pow(2).sum()))


class TwoConsumers(nn.Module):
    """conv1's channels reach two convs (two branches) -- a channel's obs score is the
    sum of its score at both."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.a, self.b = nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(4, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        return self.head(F.relu(self.a(h) + self.b(h)).mean((2, 3)))


def _batches(shape, n_batches=3, n=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=DT),
             torch.randint(0, classes, (n,), generator=g)) for _ in range(n_batches)]


def test_group_score_sums_over_consumers():
    torch.manual_seed(0)
    model = randomize_norms(TwoConsumers().double().eval())
    data = _batches((3, 6, 6))
    sal = fxprune.saliency(model, "obs", data=data, progress=False)
    expected = torch.zeros(4, dtype=DT)
    for name in ("a", "b"):
        layer, gram = getattr(model, name), LayerGram()
        with torch.no_grad():
            for x, _ in data:
                h = F.relu(model.bn(model.c1(x)))
                gram.add(layer, h, layer(h), max_rows=8 * (layer.weight[0].numel() + 1))
        expected += obs_layer_scores(layer, gram, [consumer_columns(layer, [c])
                                                   for c in range(4)])
    torch.testing.assert_close(sal.groups["c1"], expected)
    # the per-parameter scores sit on the consumers' input columns only
    assert set(n for n, s in sal.parameters.items() if s.abs().sum() > 0) <= {
        "a.weight", "b.weight", "head.weight"}


def _fixture(name, seed=0):
    torch.manual_seed(seed)
    model = create_model(name).double().eval()
    randomize_norms(model, seed)
    return model, _batches(model_input_size(name), n_batches=4, n=8, classes=10, seed=seed)


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_vit"])
def test_saliency_and_compile_end_to_end(name):
    model, data = _fixture(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sal = fxprune.saliency(model, "obs", data=data, progress=False)
    groups = {g.id: g for g in fxprune.groups(model, data[0][0])}
    for gid, s in sal.groups.items():
        assert torch.isfinite(s).all() and (s >= 0).all(), gid
        if groups[gid].prunable:
            assert s.max() > 0, gid
    res = fxprune.compile(model, "obs", data=data, flops=0.5, progress=False)
    assert res.report.flops_ratio <= 0.5 + 1e-9
    assert res.report.max_rel_error is not None and res.report.max_rel_error < 1e-6
    assert res.report.repair is not None and res.report.repair.mode == "full"
    assert any(r.action == "re-fit" for r in res.report.repair.layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = data[0][0]
    assert res.module(x).shape == model(x).shape


def test_warns_without_full_repair(caplog):
    model, data = _fixture("tiny_resnet")
    with caplog.at_level(logging.WARNING, logger="fxprune.criteria.obs"):
        fxprune.compile(model, "obs", data=data, sparsity=0.25, repair="bn", progress=False)
    assert any("repair='full'" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fxprune.criteria.obs"):
        fxprune.compile(model, "obs", data=data, sparsity=0.25, progress=False)
    assert not any("repair='full'" in r.getMessage() for r in caplog.records)


class FunctionalHead(nn.Module):
    """c2's only consumer is ``F.linear`` on a bare parameter: not measurable by obs."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.w, self.b = nn.Parameter(torch.randn(3, 6)), nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return F.linear(h.mean((2, 3)), self.w, self.b)


def test_unmeasurable_group_falls_back_to_weight_norms(caplog):
    torch.manual_seed(0)
    model, data = FunctionalHead().double(), _batches((3, 6, 6))
    with caplog.at_level(logging.WARNING, logger="fxprune.criteria.obs"):
        sal = fxprune.saliency(model, "obs", data=data, progress=False)
    assert any("c2" in r.getMessage() and "weight norm" in r.getMessage()
               for r in caplog.records)
    state = sal.context.state["obs"]
    assert state["scored_groups"] == {"c1"} and "w" in state["skipped"]
    norms = torch.stack([model.c2.weight.detach()[i].pow(2).sum() + model.c2.bias[i].detach() ** 2
                         + model.w.detach()[:, i].pow(2).sum() for i in range(6)]).sqrt()
    expected = norms * (sal.groups["c1"].mean() / norms.mean())
    torch.testing.assert_close(sal.groups["c2"], expected)


def test_bad_damping_and_missing_data_are_refused():
    model, data = _fixture("tiny_grouped")
    with pytest.raises(CriterionError, match="damp"):
        fxprune.saliency(model, "obs", data=data, damp=-1.0, progress=False)
    with pytest.raises(CriterionError, match="per_step"):
        fxprune.saliency(model, "obs", data=data, per_step=0, progress=False)
    with pytest.raises(fxprune.FxpruneError, match="calibration data"):
        fxprune.compile(model, "obs", example_inputs=data[0][0], flops=0.5)


def test_listed_by_the_registry_and_the_cli(capsys):
    assert "obs" in fxprune.list_criteria()
    from fxprune.cli import main
    assert main(["criteria"]) == 0
    assert any(line.split()[0] == "obs" for line in capsys.readouterr().out.splitlines()
               if line.strip())
