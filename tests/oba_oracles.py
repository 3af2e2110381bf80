"""Oracles of the OBA tests (test_oba*.py, test_perturb_consumer.py): tiny float64
models, the flattened δθ vector, brute-force functional-Hessian scores and OBA's
surrogate written out by hand for an attention block (design §5.1, §5.2).

Everything runs in float64 on models traced with ``torch.fx.symbolic_trace`` after
``.double().eval()``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp

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


# ----------------------------------------------------------------------------- oracles
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


def attention_forward(model, x, params):
    """The oracle Attention block written out with ``params``: (logits, activations)."""
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


def attention_reference(model, x, y, direction=None):
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
