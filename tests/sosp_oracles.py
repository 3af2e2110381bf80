"""Oracles of the SOSP tests (test_sosp.py, test_perturb_consumer.py): tiny float64 nets
(eval mode, random BN statistics), the model as a function of its flattened parameter
vector, and brute-force gradient, exact Hessian and Gauss-Newton matrix of the mean
cross-entropy (design §5.3).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import fxprune
from fxprune.criteria import ScoringContext
from fxprune.criteria.scoring import make_scoring_copy
from fxprune.models.fixtures import randomize_norms
from fxprune.passes.trace import trace

D = torch.float64
ROLES = ("producer", "bias", "norm")


# ----------------------------------------------------------------------------- models
class Chain(nn.Module):
    """conv(+bias) -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> fc."""

    def __init__(self, cin=2, w=(3, 4), classes=3, act=F.relu):
        super().__init__()
        self.act = act
        self.c1, self.b1 = nn.Conv2d(cin, w[0], 3, padding=1), nn.BatchNorm2d(w[0])
        self.c2 = nn.Conv2d(w[0], w[1], 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(w[1])
        self.fc = nn.Linear(w[1], classes)

    def forward(self, x):
        x = self.act(self.b1(self.c1(x)))
        x = self.act(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Res(nn.Module):
    """stem -> basic block (identity) -> basic block (1x1 projection) -> fc."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.a1, self.an1 = nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2)
        self.a2, self.an2 = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.b1, self.bn1 = nn.Conv2d(3, 2, 3, 2, 1, bias=False), nn.BatchNorm2d(2)
        self.b2, self.bn2 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.sc, self.scn = nn.Conv2d(3, 4, 1, 2, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.an2(self.a2(F.relu(self.an1(self.a1(x))))))
        y = self.bn2(self.b2(F.relu(self.bn1(self.b1(x)))))
        x = F.relu(y + self.scn(self.sc(x)))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.ln = nn.Linear(4, 5), nn.LayerNorm(5)
        self.l2, self.l3 = nn.Linear(5, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(F.gelu(self.ln(self.l1(x))))))


seeded = randomize_norms


def make(name):
    gen = torch.Generator().manual_seed(3)
    if name == "mlp":
        model, shape = seeded(MLP()), (5, 4)
    else:
        model, shape = seeded(Chain() if name == "chain" else Res()), (4, 2, 6, 6)
    batches = [((torch.randn(*shape, generator=gen, dtype=D),),
                torch.randint(0, 3, (shape[0],), generator=gen)) for _ in range(2)]
    return model, batches


def context(model, batches, **options):
    x = batches[0][0][0]
    groups = fxprune.groups(model, x)
    return ScoringContext(make_scoring_copy(trace(model, x)), groups, batches, None,
                          options=options), groups


# ----------------------------------------------------------------------------- oracle
class Flat:
    """The model as a function of its flattened parameter vector."""

    def __init__(self, model):
        self.model = model
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.names = list(self.params)
        self.vec = torch.cat([p.reshape(-1) for p in self.params.values()])
        self.offsets, o = {}, 0
        for n in self.names:
            self.offsets[n] = o
            o += self.params[n].numel()

    def __call__(self, v, x):
        params, o = {}, 0
        for n in self.names:
            k = self.params[n].numel()
            params[n] = v[o:o + k].view_as(self.params[n])
            o += k
        return functional_call(self.model, params, (x,))

    def structure(self, group, c, roles=ROLES):
        """θ_s on the flat vector: θ on the channel's member slices with ``roles``."""
        out = torch.zeros_like(self.vec)
        for m in group.members:
            if m.target not in self.params or (roles and m.role not in roles):
                continue
            mask = torch.zeros_like(self.params[m.target])
            mask.movedim(m.dim, 0)[list(m.index_map[c])] = 1
            o = self.offsets[m.target]
            out[o:o + mask.numel()] += (mask * self.params[m.target]).reshape(-1)
        return out


def oracle_grad(fl, batches):
    """Batch-averaged gradient of the mean cross-entropy."""
    gs = []
    for (x,), y in batches:
        v = fl.vec.clone().requires_grad_(True)
        gs.append(torch.autograd.grad(F.cross_entropy(fl(v, x), y), v)[0])
    return sum(gs) / len(gs)


def oracle_hessian(fl, batches):
    """Batch-averaged exact Hessian of the mean cross-entropy."""
    hs = [torch.autograd.functional.hessian(lambda v: F.cross_entropy(fl(v, x), y), fl.vec,
                                            vectorize=True, outer_jacobian_strategy="forward-mode")
          for (x,), y in batches]
    return sum(hs) / len(hs)


def oracle_gn(fl, batches, loss=None):
    """Batch-averaged Gauss-Newton matrix (1/N) Σ φ_nᵀ R_n φ_n."""
    total = 0
    for (x,), y in batches:
        z = fl(fl.vec, x).detach()
        phi = torch.autograd.functional.jacobian(lambda v: fl(v, x), fl.vec,
                                                 vectorize=True)  # [N, C, P]
        if loss is None:
            p = z.softmax(-1)
            R = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / z.shape[0]
            total = total + torch.einsum("ncp,ncd,ndq->pq", phi, R, phi)
        else:
            Hz = torch.autograd.functional.hessian(lambda zz: loss(zz, y), z, vectorize=True)
            total = total + torch.einsum("ncp,ncmd,mdq->pq", phi, Hz, phi)
    return total / len(batches)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
