"""Option ``batch_chunk`` of OBA, OBA-exact and SOSP-H (sub-batches with share-scaled
losses) and the cotangent pass's fallback: float64 scores equal the whole-batch ones to
1e-10 and the brute-force oracles; a loss that is not a batch mean is refused.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.criteria import ScoringContext, get_criterion
from fxprune.criteria.oba import oba_exact_scores, oba_scores
from fxprune.criteria.perturb import consumer_delta
from fxprune.criteria.sosp import sosp_h_terms
from fxprune.errors import CriterionError
from oba_oracles import (Attention, Flat, ResCNN, data, functional_hessian_scores, rel_err,
                         seeded, trace)


class ViTBlock(nn.Module):
    """LayerNorm -> attention (Q·Kᵀ, P·V) -> GELU MLP, residuals, mean-pool head."""

    def __init__(self, dim=6, heads=2, classes=3):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.att = Attention(dim=dim, heads=heads, classes=dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        b, n, d = x.shape
        a = self.att
        h = self.ln1(x)
        q, k, v = a.split(a.q(h)), a.split(a.k(h)), a.split(a.v(h))
        p = (q @ k.transpose(-2, -1) * a.hd ** -0.5).softmax(dim=-1)
        x = x + a.proj((p @ v).permute(0, 2, 1, 3).reshape(b, n, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


class Gate(nn.Module):
    """A product of two layers of the input: its node lies below every layer-input alias,
    so the cotangent pass reaches it only in its second, smaller backward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc1(x) * self.fc2(x)))


def _cases():
    return {"rescnn": (seeded(ResCNN()), data((5, 2, 6, 6), 3, n=2)),
            "vit-block": (seeded(ViTBlock()), data((5, 4, 6), 3, n=2)),
            "gate": (seeded(Gate()), data((5, 5), 3, n=2))}


def _close(got, want):
    assert want.keys() == got.keys()
    assert max(float(v.abs().max()) for v in want.values()) > 1e-6
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["rescnn", "vit-block", "gate"])
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_sub_batches_equal_whole_batches(name, chunk):
    model, batches = _cases()[name]
    gm = trace(model)
    for fn in (oba_scores, oba_exact_scores):
        for kw in ({}, {"first_order": True}):
            _close(fn(gm, batches, batch_chunk=chunk, **kw), fn(gm, batches, **kw))


def test_sub_batches_with_the_consumer_cut_and_sosp_h():
    model, batches = _cases()["rescnn"]
    gm = trace(model)
    groups = fxprune.groups(model, batches[0][0][0][:1])
    delta = consumer_delta(groups, dict(gm.named_parameters()))
    _close(oba_scores(gm, batches, delta=delta, batch_chunk=2),
           oba_scores(gm, batches, delta=delta))
    for perturb in ("weights", "consumer"):
        got = sosp_h_terms(gm, groups, batches, perturb=perturb, batch_chunk=3)
        want = sosp_h_terms(gm, groups, batches, perturb=perturb)
        for a, b in zip(got, want):
            _close(a, b)


@pytest.mark.parametrize("name", ["rescnn", "gate"])
def test_sub_batches_match_the_functional_hessian(name):
    model, batches = _cases()[name]
    (x,), y = batches[0]
    fl, ref = functional_hessian_scores(model, x, y, full=False)
    got = fl.cat(oba_scores(trace(model), batches[:1], batch_chunk=2))
    assert ref.abs().max() > 1e-6
    assert rel_err(got, ref) <= 1e-8


def test_registry_option_and_bad_values():
    model, batches = _cases()["rescnn"]
    gm = trace(model)
    for crit in ("oba", "oba-exact"):
        ctx = ScoringContext(module=gm, groups=[], batches=batches,
                             options={"batch_chunk": 2})
        want = (oba_scores if crit == "oba" else oba_exact_scores)(gm, batches)
        _close(get_criterion(crit).score(ctx), want)
    for bad in (0, -1, 2.5, "2", True):
        with pytest.raises(CriterionError, match="batch_chunk"):
            oba_scores(gm, batches, batch_chunk=bad)


def test_a_loss_that_is_not_a_batch_mean_is_refused():
    model, batches = _cases()["gate"]
    gm = trace(model)

    def summed(out, y):
        return F.cross_entropy(out, y, reduction="sum")
    oba_scores(gm, batches, summed)                 # whole batches: any loss
    for fn in (oba_scores, oba_exact_scores):
        with pytest.raises(CriterionError, match="batch mean"):
            fn(gm, batches, summed, batch_chunk=2)
    with pytest.raises(CriterionError, match="batch mean"):
        sosp_h_terms(gm, fxprune.groups(model, batches[0][0][0][:1]), batches, summed,
                     batch_chunk=2)
    fl = Flat(model)
    assert fl.cat(oba_scores(gm, batches, batch_chunk=5)).abs().max() > 0  # chunk ≥ batch


def test_inputs_without_a_shared_batch_dimension_are_refused():
    model, _ = _cases()["gate"]
    batch = ((torch.randn(4, 5, dtype=torch.float64),), torch.tensor([0, 1, 2]))
    with pytest.raises(CriterionError, match=r"first \(batch\) dimension"):
        oba_scores(trace(model), [batch], batch_chunk=2)
