"""Group members name what the user's model has (issue 16, "Misleading ... messages"):
a ``_tensor_constantN`` that tracing made says which buffer it is (or is a view of), a
tied weight used both as producer and as transposed consumer lists both roles, and a
transposed untied weight (``F.linear(x, self.w.t())``) is followed like a weight view,
its columns forming a prunable group. Pruning stays exact (masked-equivalence oracle).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune


class SlicedBuffer(nn.Module):
    """A buffer sliced by fixed indices before it meets a Proxy: tracing evaluates the
    slice and stores it as ``_tensor_constant0``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("pos", torch.randn(1, 16, 6, 6))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head((self.conv(x) + self.pos[:, :8]).mean((2, 3)))


class ListTensor(SlicedBuffer):
    """A tensor kept in a list attribute (not a buffer): also a traced constant."""

    def __init__(self):
        super().__init__()
        self.scales = [torch.rand(1, 8, 1, 1)]

    def forward(self, x):
        return self.head((self.conv(x) * self.scales[0]).mean((2, 3)))


class FreshConstant(SlicedBuffer):
    def forward(self, x):
        return self.head((self.conv(x) * torch.linspace(0.5, 1, 8).view(1, 8, 1, 1)).mean((2, 3)))


class TiedHead(nn.Module):
    """An embedding tied to the LM head: ``emb.weight``'s columns are the embedding's
    outputs (producer) and the head's inputs (consumer)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, ids):
        return F.linear(torch.relu(self.mix(self.emb(ids))), self.emb.weight)


class Transposed(nn.Module):
    """An untied weight used transposed: ``w`` is [8, 6], the layer's weight is w.t()."""

    def __init__(self, how="t"):
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.w = nn.Parameter(torch.randn(8, 6))
        self.b = nn.Linear(6, 3)
        self.how = how

    def forward(self, x):
        h = torch.relu(self.a(x))
        w = {"t": lambda: self.w.t(), "T": lambda: self.w.T,
             "transpose": lambda: self.w.transpose(0, 1),
             "permute": lambda: self.w.permute(1, 0),
             "torch.transpose": lambda: torch.transpose(self.w, -1, -2),
             "torch.permute": lambda: torch.permute(self.w, (1, 0))}[self.how]()
        return self.b(torch.relu(F.linear(h, w)))


IMAGE = torch.randn(2, 3, 6, 6)


def _member(groups, target):
    return next(m for g in groups for m in g.members if m.target == target)


@pytest.mark.parametrize("cls, origin", [
    (SlicedBuffer, "the view pos[:, 0:8] of buffer `pos`"),
    (ListTensor, "tensor `scales[0]`"),
    (FreshConstant, "a constant created by the model's forward"),
])
def test_traced_constant_names_its_origin(cls, origin):
    groups = fxprune.groups(cls(), IMAGE)
    member = _member(groups, "_tensor_constant0")
    assert member.source is not None and origin in member.source
    conv = next(g for g in groups if g.id == "conv")
    assert origin in str(conv) and member.to_dict()["source"] == member.source
    # the model's own tensors carry no source
    assert _member(groups, "conv.weight").source is None


@pytest.mark.parametrize("cls", [SlicedBuffer, ListTensor, FreshConstant])
def test_traced_constant_is_pruned_exactly(cls):
    res = fxprune.compile(cls(), "l2", example_inputs=IMAGE, sparsity=0.5)
    assert len(res.plan.kept["conv"]) == 4 and res.report.max_rel_error < 1e-5


def test_view_text_of_strided_slices():
    from fxprune.passes.constants import _slice_text
    base = torch.zeros(2, 16, 6, 6)
    assert _slice_text(base[:, 2:10:2, 1:], base) == "[:, 2:10:2, 1:6]"
    assert _slice_text(base[1], base) == ""  # not basic slices of every dim
    assert _slice_text(base[:, :, :, 3:], base) == "[:, :, :, 3:6]"


def test_tied_weight_lists_both_roles():
    """Listed only as a producer before."""
    groups = fxprune.groups(TiedHead(), torch.randint(0, 10, (2, 5)))
    cols = next(m for g in groups for m in g.members if m.target == "emb.weight" and m.dim == 1)
    assert cols.roles == ("producer", "consumer") and cols.role == "producer"
    assert "producer+consumer" in str(next(g for g in groups if cols in g.members))
    rows = next(m for g in groups for m in g.members if m.target == "emb.weight" and m.dim == 0)
    assert rows.roles == ("producer",)
    assert _member(groups, "mix.bias").roles == ("bias",)
    res = fxprune.compile(TiedHead(), "l2", example_inputs=torch.randint(0, 10, (2, 5)),
                          sparsity=0.5)
    assert res.report.max_rel_error < 1e-5


@pytest.mark.parametrize("how", ["t", "T", "transpose", "permute", "torch.transpose",
                                 "torch.permute"])
def test_transposed_weight_is_followed(how):
    """``w``'s 6 columns are the layer's outputs: before, they formed no group (b's
    inputs were silently unprunable) and ``w``'s rows were a mere "tensor" member."""
    model = Transposed(how)
    groups = {g.id: g for g in fxprune.groups(model, torch.randn(2, 5))}
    assert groups["w"].size == 6 and groups["w"].prunable
    assert groups["w"].member("w", 1).role == "producer"
    assert groups["w"].member("b.weight", 1).role == "consumer"
    assert groups["a"].member("w", 0).role == "consumer"
    res = fxprune.compile(model, "l2", example_inputs=torch.randn(2, 5), sparsity=0.5)
    assert len(res.plan.kept["w"]) == 3 and len(res.plan.kept["a"]) == 4
    assert res.report.max_rel_error < 1e-5
    assert dict(res.module.named_parameters())["w"].shape == (4, 3)


def test_transposed_activation_keeps_its_channels():
    """``x.mT`` was read as metadata: its channels were lost, so the consumer coupled
    nothing. Now it is a permute, and the linear's columns join the conv's group."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mT).mean(1)

    groups = {g.id: g for g in fxprune.groups(M(), torch.randn(2, 3, 5))}
    assert groups["conv"].prunable and groups["conv"].member("fc.weight", 1).role == "consumer"
    res = fxprune.compile(M(), "l2", example_inputs=torch.randn(2, 3, 5), sparsity=0.5)
    assert res.report.max_rel_error < 1e-5
