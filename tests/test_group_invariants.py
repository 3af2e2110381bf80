"""Channel analysis (design §3), the invariant: zeroing every member slice of a set of a
group's channels removes exactly those channels' effect (float64, every fixture, small
hand-written modules), and sizes computed at run time that rewrite or fail closed.
The golden group structure of every fixture is in test_groups.py.
"""
from __future__ import annotations

import contextlib
import random

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.models import create_model, list_models, model_input_size

FIXTURES = [name for name in list_models() if name.startswith("tiny_")]


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so zeroing them matters."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)


@contextlib.contextmanager
def _zeroed(model: nn.Module, group, channels, keep_roles=None, skip_roles=()):
    """``model`` with the member slices of ``channels`` zeroed in place (only members whose
    role is in ``keep_roles``, if given, and not in ``skip_roles``); restored on exit."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    saved = []
    with torch.no_grad():
        for m in group.members:
            if (keep_roles is not None and m.role not in keep_roles) or m.role in skip_roles:
                continue
            idx = sorted({i for c in channels for i in m.index_map[c]})
            if idx:
                t, index = tensors[m.target], torch.tensor(idx)
                saved.append((t, m.dim, index, t.index_select(m.dim, index)))
                t.index_fill_(m.dim, index, 0.0)
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, dim, index, values in reversed(saved):
                t.index_copy_(dim, index, values)


def _output(model, x, group, channels, **roles) -> torch.Tensor:
    with _zeroed(model, group, channels, **roles), torch.no_grad():
        return model(x)


def _has_layernorm(model: nn.Module, group) -> bool:
    mods = dict(model.named_modules())
    return any(isinstance(mods.get(m.target.rpartition(".")[0]), nn.LayerNorm) for m in group.members)


@pytest.mark.parametrize("name", FIXTURES + ["cifar_resnet20"])
def test_zeroing_members_removes_exactly_the_channels(name, one_thread):
    """float64, eval mode. For every prunable group and a random half of its channels S:

    - A (every member slice of S zeroed) == B (only the consumer columns of S zeroed):
      the members account for everything S does downstream. Groups with a LayerNorm
      member are exempt: removing a channel changes its statistics by design (§7).
    - A == C (every member slice but the consumers zeroed): the producers, biases and norms
      silence S completely, so the consumer columns see exact zeros (every fixture's
      activation maps 0 to 0). This also catches a missing producer or norm member.
    - Zeroing changes the output for at least one group (the test is not vacuous)."""
    torch.manual_seed(0)
    model = create_model(name).double().eval()
    gen = torch.Generator().manual_seed(1)
    _randomise_norms(model, gen)
    x = torch.randn(2, *model_input_size(name), dtype=torch.float64)
    groups = [g for g in fxprune.groups(model, x) if g.prunable]
    assert groups
    rng = random.Random(2)
    with torch.no_grad():
        dense = model(x)
    changed = 0
    for g in groups:
        channels = rng.sample(range(g.size), max(1, g.size // 2))
        out_all = _output(model, x, g, channels)
        if not _has_layernorm(model, g):
            out_consumers = _output(model, x, g, channels, keep_roles={"consumer"})
            torch.testing.assert_close(out_all, out_consumers, rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"group {g.id}: {m}")
        out_silenced = _output(model, x, g, channels, skip_roles={"consumer"})
        torch.testing.assert_close(out_all, out_silenced, rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"group {g.id}: {m}")
        changed += not torch.allclose(out_all, dense)
    assert changed >= len(groups) // 2
    with torch.no_grad():
        assert torch.equal(model(x), dense)  # the in-place zeroing was undone


class _GLU(nn.Module):
    """chunk(2) of one Linear's output, one half gating the other."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(16, 4)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, -1)
        return self.fc2(a * torch.sigmoid(b))


class _UNetish(nn.Module):
    """A skip connection concatenated with an upsampled deeper feature map."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        up = nn.functional.interpolate(torch.relu(self.c2(a)), scale_factor=2.0)
        return self.fc(self.c3(torch.cat([a, up], 1)).mean((2, 3)))


class _ConvSE(nn.Module):
    """timm-style squeeze-excite with 1x1 convs on a keepdim mean; view-flatten head."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.r, self.e = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        y = torch.relu(self.c(x))
        gate = torch.sigmoid(self.e(torch.relu(self.r(y.mean((2, 3), keepdim=True)))))
        y = y * gate
        return self.fc(y.view(y.size(0), -1))


class _NormsAndTransposed(nn.Module):
    """GroupNorm (pruned in whole norm groups) and a transposed conv."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.t = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.t(torch.relu(self.gn(self.c(x))))).mean((2, 3)))


class _SeparateHeads(nn.Module):
    """Separate q/k/v Linears split into 2 heads; head_dim is computed at run time from
    the (never pruned) input width, the merge back uses a literal width."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.heads, self.dim = heads, d
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        p = (split(self.q(x)) @ split(self.k(x)).transpose(-2, -1)).softmax(-1)
        return self.fc(self.o((p @ split(self.v(x))).transpose(1, 2).reshape(b, n, self.dim)).mean(1))


SMALL = {
    "glu": (_GLU, (8,), {"fc1": (16, "channel")}),
    "unet": (_UNetish, (3, 8, 8), {"c1": (8, "channel"), "c2": (8, "channel"), "c3": (4, "channel")}),
    "conv_se": (_ConvSE, (3, 8, 8), {"c": (8, "channel"), "r": (2, "channel")}),
    "groupnorm_transposed": (_NormsAndTransposed, (3, 8, 8), {"c": (4, "channel"), "t": (6, "channel")}),
    "separate_heads": (_SeparateHeads, (5, 8), {"q": (2, "head"), "o": (8, "channel")}),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_modules_groups_and_invariant(name, one_thread):
    """More coupling patterns: the groups' sizes/kinds, and the zeroing invariant."""
    make, shape, expected = SMALL[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    groups = {g.id: g for g in fxprune.groups(model, x)}
    assert {k: (g.size, g.kind) for k, g in groups.items() if g.prunable} == expected
    rng = random.Random(0)
    for g in groups.values():
        if g.prunable:
            channels = rng.sample(range(g.size), max(1, g.size // 2))
            out_all = _output(model, x, g, channels)
            torch.testing.assert_close(out_all, _output(model, x, g, channels, keep_roles={"consumer"}))
            torch.testing.assert_close(out_all, _output(model, x, g, channels, skip_roles={"consumer"}))


class _ComputedSizes(nn.Module):
    """Attention written with sizes read at run time: ``C // H`` from the stream sizes
    the qkv head split and the stream's C sizes the merged heads (BEiT). Each sizes a
    channel dim, so the rewrite replaces it (-1 or the kept size) and both the stream
    and the heads stay prunable. ``numel_sizes``: head_dim derived from ``numel()``,
    which is not a shape read: fail closed."""

    def __init__(self, d: int = 16, heads: int = 2, numel_sizes: bool = False):
        super().__init__()
        self.heads, self.numel_sizes = heads, numel_sizes
        self.embed = nn.Conv2d(3, d, 2, 2)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        y = self.embed(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        b, h, w, c = y.shape
        t = y.view(b, h * w, c)
        qkv = self.qkv(t)
        head_dim = qkv.numel() // (b * h * w * 3 * self.heads) if self.numel_sizes else c // self.heads
        qkv = qkv.reshape(b, h * w, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        t = t + self.proj((a @ v).transpose(1, 2).reshape(b, h * w, c))
        return self.head(self.fc2(torch.relu(self.fc1(t))).mean(1))


def test_sizes_computed_at_run_time_are_rewritten():
    model = _ComputedSizes().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    groups = {g.id: g for g in fxprune.groups(model, x)}
    assert all(groups[gid].prunable for gid in ("embed", "qkv", "fc1"))
    res = fxprune.compile(model, "l1", example_inputs=x, sparsity=0.5)  # masked oracle inside
    kept = {row.id: row.kept for row in res.report.groups}
    assert kept["embed"] == 8 and kept["qkv"] == 1 and res.report.max_rel_error <= 1e-6
    bigger = torch.randn(3, 3, 12, 12, dtype=torch.float64)  # spatial sizes stay run-time values
    assert res.module(bigger).shape == (3, 3)


def test_size_from_a_non_shape_value_fails_closed():
    model = _ComputedSizes(numel_sizes=True).eval()
    x = torch.randn(2, 3, 8, 8)
    groups = {g.id: g for g in fxprune.groups(model, x)}
    assert not groups["qkv"].prunable
    assert "a size computed at run time" in groups["qkv"].reason
    assert groups["fc1"].prunable
    res = fxprune.compile(model, "l1", example_inputs=x, sparsity=0.25)  # no invalid reshape
    assert res.module(x).shape == (2, 3)


def test_size_read_from_the_same_channels_stays_prunable():
    """``view(-1, C)`` of a branch output with C read from the residual stream it is
    added to (Swin's windows): the same channels once the add is seen."""
    class Windowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x)  # [B, N, C]
            c = h.shape[-1]
            y = self.b(torch.relu(self.a(h))).view(-1, c)  # C from the stream
            h = h + y.view(h.shape[0], -1, c)
            return self.head(h.mean(1))

    groups = {g.id: g for g in fxprune.groups(Windowed().eval(), torch.randn(2, 5, 4))}
    assert groups["embed"].prunable and groups["a"].prunable
