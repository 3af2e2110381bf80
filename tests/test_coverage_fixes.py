"""The coverage run's last failures (issue 16): a ``torch.no_grad()`` block inside
``forward`` on the export front end (timm gemma4_vit), the automatic switch to export when
the FX graph fails shape propagation (a ``None`` default argument traced as an input) or
needed leaf retries for a shape check (timm TinyViT), the budget error that names the
groups blocking it, and verification / rewrite that make no dense copy of the weights.
"""
import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import BudgetError, TraceError
from fxprune.passes.frontend import capture
from fxprune.passes.groups import analyze
from fxprune.passes.rewrite import rewrite
from fxprune.passes.verify import check, masked_reference, verify_rewrite


class NoGradTable(nn.Module):
    """A rotary-style table computed under ``no_grad`` from a buffer, the input and a
    parameter (whose gradient must stop at the block, as in eager mode)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("freq", torch.arange(4.0) / 4)

    def forward(self, x):
        with torch.no_grad():
            table = (self.freq[None] * x.sum(-1, keepdim=True) * self.scale).cos()
        return self.b(torch.relu(self.a(x))) * table


def test_no_grad_block_is_inlined_and_prunes_exactly():
    torch.manual_seed(0)
    model, x = NoGradTable().eval(), torch.randn(3, 8)
    gm = capture(model, x, frontend="export")
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not any("wrap_with_set_grad_enabled" in t for t in targets)
    torch.testing.assert_close(gm(x), model(x))
    # reverse mode: the block's outputs are detached, like under no_grad
    gm(x).sum().backward()
    model(x).sum().backward()
    assert model.scale.grad is None and gm.get_parameter("scale").grad is None
    assert gm.get_parameter("a.weight").grad is not None
    res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5, frontend="export")
    assert res.report.max_rel_error < 1e-5
    assert res.module.get_parameter("a.weight").shape[0] == 8
    torch.testing.assert_close(res.module(x).shape, model(x).shape)


class OptionalMask(nn.Module):
    """``mask=None`` by default: symbolic tracing makes it an input and traces ``~mask``,
    so the FX graph fails on the example inputs (gemma4_vit's ``patch_valid``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x, mask=None):
        h = torch.relu(self.a(x))
        if mask is not None:
            h = h.masked_fill((~mask).unsqueeze(-1), 0.0)
        return self.b(h)


def test_shape_propagation_failure_falls_back_to_export():
    torch.manual_seed(0)
    model, x = OptionalMask().eval(), torch.randn(2, 5, 8)
    with pytest.raises(TraceError, match="unary ~"):
        capture(model, x, frontend="fx")
    res = fxprune.compile(model, "l2", example_inputs=x, flops=0.6)
    assert res.report.frontend == "export"
    assert res.report.max_rel_error < 1e-5
    notes = [n for n in res.report.notes if n.startswith("frontend: torch.export")]
    assert len(notes) == 1 and "unary ~" in notes[0]


class WindowBlock(nn.Module):
    """A shape check in a block (timm TinyViT's window attention): symbolic tracing
    fails inside it, export takes the branch the example shape picks."""

    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        if x.shape[1] == 7:
            x = x.flip(1)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 12)
        self.blocks = nn.Sequential(WindowBlock(12), WindowBlock(12))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(1))


def test_leaf_retry_for_a_shape_check_switches_to_export():
    torch.manual_seed(0)
    model, x = Blocks().eval(), torch.randn(2, 6, 8)
    fx = {g.id: g for g in analyze(capture(model, x, frontend="fx")).groups}
    assert not any(g.prunable for g in fx.values())  # leaves: every hidden width fixed
    res = fxprune.compile(model, "l2", example_inputs=x, flops=0.6)
    assert res.report.frontend == "export"
    assert res.report.max_rel_error < 1e-5 and res.report.flops_ratio <= 0.6 + 1e-6
    assert res.module.get_parameter("blocks.0.fc1.weight").shape[0] < 48
    note = next(n for n in res.report.notes if n.startswith("frontend: torch.export"))
    assert "`blocks.0` (WindowBlock)" in note and "leaves" in note


@torch.fx.wrap
def mystery(x):
    return x * torch.sigmoid(x)


class Blocked(nn.Module):
    """A wide layer whose output meets an op with no channel rule: it holds most of
    the FLOPs and cannot be pruned."""

    def __init__(self):
        super().__init__()
        self.small = nn.Conv2d(3, 4, 1)
        self.wide = nn.Conv2d(4, 64, 3, padding=1)
        self.out = nn.Conv2d(64, 4, 1)

    def forward(self, x):
        return self.out(mystery(self.wide(torch.relu(self.small(x))))).mean((2, 3))


def test_budget_error_names_the_biggest_blocker():
    torch.manual_seed(0)
    model, x = Blocked().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(BudgetError) as err:
        fxprune.compile(model, "l2", example_inputs=x, flops=0.3, frontend="fx")
    msg = str(err.value)
    assert "cannot be reached" in msg and "see the groups' reasons" not in msg
    assert "the groups holding the most flops that cannot be pruned: `wide`" in msg
    assert "% of the flops)" in msg and "mystery" in msg


def _dense_copy_free(model, x, kept_fraction=0.5):
    analysis = analyze(capture(model, x, share_params=True, lazy=False))
    kept = {g.id: list(range(max(1, int(g.size * kept_fraction))))
            for g in analysis.groups if g.prunable}
    return analysis, kept, rewrite(analysis, kept)


def test_rewrite_owns_its_tensors_and_lean_verification_equals_the_copy():
    torch.manual_seed(0)
    model, x = NoGradTable().eval(), torch.randn(3, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analysis, kept, slim = _dense_copy_free(model, x)
    user = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    # the dense graph reads the user's tensors; the slim model owns every tensor
    assert {p.data_ptr() for p in analysis.gm.parameters()} <= user
    assert not any(t.data_ptr() in user for t in list(slim.parameters()) + list(slim.buffers()))
    lean = verify_rewrite(analysis, slim, kept, (x,))
    assert lean == pytest.approx(check(slim, masked_reference(analysis, kept), (x,)), abs=1e-9)
    assert lean < 1e-6
    # the per-node masking really masks: an unmasked dense weight in the slim is caught
    with torch.no_grad():
        slim.get_parameter("b.weight")[0].add_(1.0)
    with pytest.raises(fxprune.FxpruneError, match="verification failed"):
        verify_rewrite(analysis, slim, kept, (x,))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
