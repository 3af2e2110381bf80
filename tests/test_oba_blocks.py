"""OBA's curvature H̃ is non-zero exactly on series and parallel layer pairs (design §4).

Brute force over layer pairs: H̃ is built column by column on tiny float64 nets —
for piecewise-linear nets H̃ equals the functional Hessian H_F (design §5.1 oracle);
for attention, from OBA's surrogate S written out by hand with a unit direction.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

import fxprune
import oba_oracles as oracles
from fxprune.criteria.oba import oba_scores


class TwoBranch(nn.Module):
    """Two conv branches that meet only at an add, then a head (series to both)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = torch.relu(self.a(h)) + self.b(h)
        return self.head(y.mean((2, 3)))


def layer_slices(fl):
    out, offset = {}, 0
    for name in fl.names:
        n = fl.params[name].numel()
        layer = name.rsplit(".", 1)[0]
        start, _ = out.get(layer, (offset, offset))
        out[layer] = (start, offset + n)
        offset += n
    return out


def functional_hessian(model, x, y):
    fl = oracles.Flat(model)
    f0 = fl(fl.vec, x).detach().requires_grad_(True)
    gf = torch.autograd.grad(F.cross_entropy(f0, y), f0)[0]
    H = torch.autograd.functional.hessian(lambda v: (gf * fl(v, x)).sum(), fl.vec,
                                          vectorize=True)
    return fl, H


def surrogate_hessian_attention(model, x, y):
    """H̃ column j = ∇_θ S(θ; δ=e_j) with OBA's S for the oracle Attention block."""
    fl = oracles.Flat(model)
    lin = ["q", "k", "v", "proj", "head"]
    params0 = fl.unflat(fl.vec)

    def forward(params):
        return oracles.attention_forward(model, x, params)

    live = {k: t.detach().requires_grad_(True) for k, t in params0.items()}
    out, inter = forward(live)
    zs = ["s", "pv"]  # the attention products; layer outputs' cotangents come from hooks
    g = dict(zip(zs, torch.autograd.grad(F.cross_entropy(out, y), [inter[z] for z in zs])))
    cot = _layer_cotangents(model, x, y)

    def acts(vec):
        return forward(fl.unflat(vec))[1]

    def column(direction):
        _, T = jvp(acts, (fl.vec,), (direction,))
        dP = fl.unflat(direction)

        def S(vec):
            A, P = acts(vec), fl.unflat(vec)
            tot = (g["s"] * (A["q"] @ T["k"].transpose(-2, -1) + T["q"] @ A["k"].transpose(-2, -1))).sum()
            tot = tot + (g["pv"] * (A["p"] @ T["v"] + T["p"] @ A["v"])).sum()
            for n in lin:
                tot = tot + (cot[n] * (F.linear(T[f"{n}_in"], P[f"{n}.weight"])
                                       + F.linear(A[f"{n}_in"], dP[f"{n}.weight"]))).sum()
            return tot
        return torch.func.grad(S)(fl.vec)

    eye = torch.eye(fl.vec.numel(), dtype=fl.vec.dtype)
    return fl, torch.func.vmap(column)(eye).T  # row j of vmap's output is column j


def _layer_cotangents(model, x, y):
    """∂L/∂(output of each Linear) via hooks on a float64 forward."""
    outs = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda mod, inp, out, n=n: outs.__setitem__(n, out)) for n in ["q", "k", "v", "proj", "head"]]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    names = list(outs)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), [outs[n] for n in names])
    return {n: gr.detach() for n, gr in zip(names, grads)}


def check_blocks(model, x, fl, H, expect_kinds):
    conn = fxprune.connectivity(model, x)
    slices = layer_slices(fl)
    seen = set()
    for a, (a0, a1) in slices.items():
        for b, (b0, b1) in slices.items():
            kind = conn.kind(a, b)
            block = H[a0:a1, b0:b1]
            if kind is None and a != b:
                assert block.abs().max() <= 1e-10, f"{a},{b}: None but H̃ block non-zero"
            elif kind is not None:
                assert block.abs().max() > 1e-8, f"{a},{b}: {kind} but H̃ block is zero"
            seen.add(kind)
    assert expect_kinds <= seen


def test_piecewise_linear_blocks_follow_connectivity():
    model = oracles.seeded(TwoBranch())
    (x,), y = oracles.data((2, 1, 4, 4), 3)[0]
    fl, H = functional_hessian(model, x, y)
    assert fxprune.connectivity(model, x).kind("a", "b") is None
    check_blocks(model, x, fl, H, {"series", None})


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_parallel_blocks_are_non_zero(heads):
    model = oracles.seeded(oracles.Attention(dim=4, heads=heads))
    (x,), y = oracles.data((2, 3, 4), 3)[0]
    fl, H = surrogate_hessian_attention(model, x, y)
    conn = fxprune.connectivity(model, x)
    assert conn.kind("q", "k") == "parallel" and conn.kind("k", "v") == "parallel"
    check_blocks(model, x, fl, H, {"series", "parallel"})
    # H̃θ from the brute-force matrix equals what the OBA pass computes
    scores = fl.cat(oba_scores(oracles.trace(model), [((x,), y)]))
    assert oracles.rel_err(scores, fl.vec * (H @ fl.vec)) <= 1e-8
