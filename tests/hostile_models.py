"""Models and helpers of the hostile-input tests (tests/test_hostile_*.py).

Each hostile input gets a clear FxpruneError or a documented behaviour, and the input
model is bit-identical afterwards (state_dict, dtype, training flags): :class:`Unchanged`
checks it. Criteria: "l2" (data-free), "oba" (data-driven, second order), "taylor"
(first order); :data:`DATA_CRITERIA` are the data-driven ones the registry holds.
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import fxprune

DATA_CRITERIA = [c for c in ("oba", "taylor") if c in fxprune.list_criteria()]


# ----------------------------------------------------------------------------- models
class Net(nn.Module):
    """conv-BN-relu-conv-relu-pool-linear; ``out`` selects the output structure."""

    def __init__(self, out: str = "tensor"):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)
        self.out = out

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        y = F.relu(self.c2(y)).mean((2, 3))
        z = self.fc(y)
        if self.out == "dict":
            return {"logits": z, "features": y}
        if self.out == "tuple":
            return z, y
        return z


@dataclasses.dataclass
class Output:
    logits: torch.Tensor


class DataclassNet(Net):
    def forward(self, x):
        return Output(super().forward(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: not traceable
            return x
        return -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Net()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.net(x))


class TiedLinear(nn.Module):
    """``b.weight`` is ``a.weight`` (one Parameter under two names)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = F.relu(self.a(y))
        return self.fc(F.relu(self.b(y)))


class TransposedTie(nn.Module):
    """An encoder weight reused, transposed, as a decoder (autoencoder-style)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 7)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.enc(x))
        return self.fc(F.linear(h, self.enc.weight.t()))


class SharedByTwoNames(nn.Module):
    """One Linear registered under two attribute names and called twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.first = nn.Linear(6, 6)
        self.second = self.first
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = F.relu(self.first(y))
        return self.fc(F.relu(self.second(y)))


class ChannelBuffer(nn.Module):
    """A registered [C, 1, 1] buffer added to the features (used as is), and a [C]
    buffer viewed eagerly (torch.fx folds the view into a constant)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.register_buffer("offset", torch.randn(6, 1, 1))
        self.register_buffer("scale", torch.rand(6) + 0.5)
        self.c2 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.c1(x) + self.offset) * self.scale.view(1, -1, 1, 1)
        return self.fc(self.c2(y).mean((2, 3)))


# ----------------------------------------------------------------------------- helpers
def make(model=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = (model or Net()).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def batch(n=4, dtype=torch.float64, seed=0, classes=4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 5, 5, generator=gen, dtype=dtype),
            torch.randint(0, classes, (n,), generator=gen))


def bit_equal(a, b):
    """Bitwise equality (NaN == NaN with the same payload)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.contiguous().view(as_int), b.contiguous().view(as_int)
    return torch.equal(a, b)


class Unchanged:
    """Context manager: the model is bit-identical on exit (also after an error)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        m = self.model
        self.state = {k: v.clone() for k, v in m.state_dict().items()}
        self.flags = {n: s.training for n, s in m.named_modules()}
        self.grads = {n: p.requires_grad for n, p in m.named_parameters()}
        self.ids = {n: id(p) for n, p in m.named_parameters(remove_duplicate=False)}
        return m

    def __exit__(self, *exc):
        m = self.model
        now = m.state_dict()
        assert now.keys() == self.state.keys()
        for k, v in now.items():
            assert bit_equal(v, self.state[k]), k
        assert {n: s.training for n, s in m.named_modules()} == self.flags
        assert {n: p.requires_grad for n, p in m.named_parameters()} == self.grads
        assert {n: id(p) for n, p in m.named_parameters(remove_duplicate=False)} == self.ids
        assert all(p.grad is None for p in m.parameters())
        return False


def kwargs_for(criterion, data):
    return {"data": data} if criterion != "l2" else {"example_inputs": data[0][0]}
