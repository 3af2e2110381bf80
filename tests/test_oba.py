"""OBA / OBA-exact per-parameter scores against brute-force oracles (design §5.1, §5.2).

Oracles (models, flattened δθ, functional Hessian, hand-written surrogate) live in
``oba_oracles.py``; everything runs in float64.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.criteria.oba import oba_exact_scores, oba_scores
from oba_oracles import (Attention, Flat, ResCNN, attention_reference, data,
                         functional_hessian_scores, rel_err, seeded, trace, vgg19_tiny)


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


@pytest.mark.parametrize("heads", [1, 2])
def test_oba_attention_matches_hand_written_surrogate(heads):
    model = seeded(Attention(dim=6, heads=heads))
    batch = data((2, 4, 6), 3)[0]
    (x,), y = batch
    fl, ref = attention_reference(model, x, y)
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
