"""Degenerate scores fail loud, and ties are broken by weight norm (issue 14, design §5.5).

Tiny float64 residual nets: all-zero / all-equal scores everywhere raise
``DegenerateScoresError`` with the reason and the fix; a distillation loss (zero loss
gradient at the dense model) with OBA says to score with labels; one tied group warns
and gets a report note; tied channels are removed by ascending weight norm, never by
channel index -- also for the zero-initialised last BN of residual blocks that random
timm weights have.
"""
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.criteria import Criterion, register_criterion
from fxprune.criteria.aggregate import weight_norms
from fxprune.passes.degenerate import stationary_shift
from fxprune.errors import DegenerateScoresError, FxpruneError
from fxprune.models.fixtures import randomize_norms
from fxprune.passes.select import global_order, select_uniform, tied_groups
from fxprune.passes.trace import trace

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity (a ResNet basic block)."""

    def __init__(self, width, mid):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    """stem, two basic blocks, pooled Linear head."""

    def __init__(self, width=6, mid=8, classes=3):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, width, 3, padding=1), nn.BatchNorm2d(width)
        self.block1, self.block2 = Block(width, mid), Block(width, mid)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        return self.fc(self.block2(self.block1(x)).mean((2, 3)))


def make(zero_init=(), seed=0):
    """A float64 ``Net`` in eval mode with random BN statistics; the blocks named in
    ``zero_init`` get ``bn2.weight = 0`` (timm's ``zero_init_last`` for random weights)."""
    torch.manual_seed(seed)
    model = randomize_norms(Net(), seed)
    for name in zero_init:
        getattr(model, name).bn2.weight.data.zero_()
    return model


def batches(model, n=2, distill=False):
    """Calibration batches labelled by the model's own predictions, or (``distill``)
    with the dense model's outputs as regression targets."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(4, 2, 6, 6, generator=gen, dtype=D)
        with torch.no_grad():
            y = model(x)
        out.append((x, y if distill else y.argmax(1)))
    return out


def mse(outputs, targets):
    return F.mse_loss(outputs, targets)


def compile_quiet(model, criterion, data=None, **kw):
    x = data[0][0] if data else torch.randn(2, 2, 6, 6, dtype=D)
    return fxprune.compile(model, criterion, example_inputs=x, data=data, progress=False, **kw)


# --------------------------------------------------------------------------- errors
def test_all_zero_weights_raise_for_l2():
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.raises(DegenerateScoresError, match="are all zero") as err:
        compile_quiet(model, "l2", flops=0.5)
    assert isinstance(err.value, FxpruneError)
    assert "weights of every prunable channel are zero" in str(err.value)
    assert "load trained weights" in str(err.value)


def test_constant_weights_raise_for_l2():
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.1)
    with pytest.raises(DegenerateScoresError, match="all equal within each group") as err:
        compile_quiet(model, "l2", sparsity=0.5)
    assert "same weight norm" in str(err.value)


def test_distillation_loss_with_oba_raises_with_the_labels_hint():
    """MSE against the dense model's own outputs: the loss gradient is zero at the
    dense model, so OBA's gradient-weighted curvature is zero for every channel."""
    model = make()
    data = batches(model, distill=True)
    sal = fxprune.saliency(model, "oba", data=data, loss_fn=mse, progress=False)
    assert all(float(s.abs().max()) == 0.0 for s in sal.groups.values())
    for first_order in (False, True):  # θ·g is zero too: first_order=True cannot help
        with pytest.raises(DegenerateScoresError) as err:
            compile_quiet(model, "oba", data, loss_fn=mse, flops=0.5, first_order=first_order)
        msg = str(err.value)
        assert "the loss gradient is zero at the dense model" in msg.lower()
        assert "score with labels" in msg and "first_order=True" in msg
        assert "'oba-exact' or 'sosp-h'" in msg
    # the hint holds: the full Hessian keeps the loss curvature (Gauss-Newton part)
    res = compile_quiet(model, "oba-exact", data, loss_fn=mse, flops=0.5, verify=False)
    assert res.report.flops_ratio <= 0.5
    # and the same plan works with labels
    compile_quiet(model, "oba", batches(model), flops=0.5, verify=False)


def test_distillation_targets_off_by_rounding_still_raise():
    """Dense outputs computed another way (fused attention vs. its math form while
    scoring) differ by rounding: the OBA scores are then noise, not zero, and still
    refused; a real task loss is not (its outputs are far from the loss minimum)."""
    model = make()
    gen = torch.Generator().manual_seed(2)
    data = [(x, y * (1 + 1e-13 * torch.randn(y.shape, generator=gen, dtype=D)))
            for x, y in batches(model, distill=True)]
    sal = fxprune.saliency(model, "oba", data=data, loss_fn=mse, progress=False)
    assert max(float(s.abs().max()) for s in sal.groups.values()) > 0.0
    with pytest.raises(DegenerateScoresError, match="rounding noise") as err:
        compile_quiet(model, "oba", data, loss_fn=mse, flops=0.5)
    assert "score with labels" in str(err.value)
    ctx = SimpleNamespace(module=trace(model, data[0][0]), batches=batches(model),
                          loss_fn=F.cross_entropy)
    assert stationary_shift(ctx) > 1e-3
    ctx.batches, ctx.loss_fn = data, mse
    assert stationary_shift(ctx) < 1e-11


def test_distillation_loss_with_taylor_raises_with_its_fix():
    model = make()
    with pytest.raises(DegenerateScoresError, match="taylor scores are θ·g") as err:
        compile_quiet(model, "taylor", batches(model, distill=True), loss_fn=mse, flops=0.5)
    assert "loss gradient is zero at the dense model" in str(err.value)


def test_zero_criterion_with_a_live_gradient_says_so():
    register_criterion(Criterion(
        "test-zeros", "all-zero scores (test)", needs_data=True,
        score=lambda ctx: {n: torch.zeros_like(p) for n, p in ctx.module.named_parameters()}),
        overwrite=True)
    model = make()
    with pytest.raises(DegenerateScoresError, match="loss gradient is not zero"):
        compile_quiet(model, "test-zeros", batches(model), flops=0.5)


# --------------------------------------------------------------------------- warning
def group_of(model, module_name):
    """The group whose producer is ``module_name``'s weight."""
    x = torch.randn(2, 2, 6, 6, dtype=D)
    for g in fxprune.groups(model, x):
        if any(m.role == "producer" and m.target == f"{module_name}.weight" for m in g.members):
            return g
    raise AssertionError(module_name)


def test_one_tied_group_warns_and_notes(caplog):
    model = make(zero_init=("block1",))
    gid = group_of(model, "block1.conv1").id
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        res = compile_quiet(model, "oba", batches(model), flops=0.7)
    tied = [r for r in caplog.records if "tie" in r.getMessage()]
    assert len(tied) == 1 and tied[0].levelno == logging.WARNING
    msg = tied[0].getMessage()
    assert f"`{gid}`" in msg and "all zero" in msg and "ranked by weight norm" in msg
    assert "block2" not in msg  # the other block's scores rank its channels
    assert msg in res.report.notes and msg in res.report.table()


def test_tied_groups_kinds_and_tolerance():
    groups = [SimpleNamespace(id=k) for k in ("zero", "equal", "ulps", "fine", "capped")]
    one = torch.tensor(1.0, dtype=D)
    scores = {"zero": torch.zeros(3, dtype=D), "equal": torch.full((3,), -2.0, dtype=D),
              "ulps": torch.stack([one, torch.nextafter(one, torch.tensor(2.0, dtype=D))]),
              "fine": torch.tensor([1.0, 1.001], dtype=D), "capped": torch.zeros(3, dtype=D)}
    caps = {"zero": 2, "equal": 2, "ulps": 1, "fine": 1, "capped": 0}
    assert tied_groups(groups, scores, caps) == {"zero": "zero", "equal": "equal",
                                                 "ulps": "equal"}


# --------------------------------------------------------------------------- tie-break
def test_ties_are_ordered_by_weight_norm_not_index():
    groups = [SimpleNamespace(id=gid, size=n, members=[]) for gid, n in (("a", 4), ("b", 3))]
    scores = {"a": torch.zeros(4), "b": torch.tensor([3.0, 1.0, 1.0])}
    norms = {"a": torch.tensor([4.0, 1.0, 3.0, 2.0]), "b": torch.tensor([1.0, 5.0, 2.0])}
    caps = {"a": 3, "b": 2}
    order = global_order(groups, scores, caps, "mean", tiebreak=norms)
    assert order == [("a", 1), ("a", 3), ("a", 2), ("b", 2), ("b", 1)]
    assert global_order(groups, scores, caps, "mean")[:3] == [("a", 0), ("a", 1), ("a", 2)]
    kept = select_uniform(groups, scores, 0.5, caps, tiebreak=norms)
    assert kept == {"a": [0, 2], "b": [0, 1]}  # b: 1.0 = 1.0 tie, norm 2 < 5 goes


def test_tied_groups_interleave_by_relative_weight_norm():
    """Two all-zero groups: the tie-break is normalised like the scores, so neither
    group is drained first just because its weights are smaller."""
    groups = [SimpleNamespace(id="small", size=2), SimpleNamespace(id="big", size=2)]
    scores = {"small": torch.zeros(2), "big": torch.zeros(2)}
    norms = {"small": torch.tensor([0.1, 0.3]), "big": torch.tensor([25.0, 15.0])}
    order = global_order(groups, scores, {"small": 2, "big": 2}, "mean", tiebreak=norms)
    assert order == [("small", 0), ("big", 1), ("big", 0), ("small", 1)]


def test_weight_norms_are_the_l2_criterion():
    model = make()
    x = torch.randn(2, 2, 6, 6, dtype=D)
    gm = trace(model, x)
    groups = fxprune.groups(model, x)
    norms = weight_norms(groups, gm)
    l2 = fxprune.saliency(model, "l2", example_inputs=x).groups
    assert set(norms) == set(l2)
    for gid, n in norms.items():
        assert n.dtype == D
        torch.testing.assert_close(n, l2[gid].to(D), rtol=1e-12, atol=0)


def kept_by_norm(model, gid, n_kept):
    """The ``n_kept`` channels of group ``gid`` with the largest weight norm."""
    x = torch.randn(2, 2, 6, 6, dtype=D)
    group = next(g for g in fxprune.groups(model, x) if g.id == gid)
    norms = weight_norms([group], model)[gid]
    return sorted(torch.argsort(norms, descending=True)[:n_kept].tolist())


@pytest.mark.parametrize("budget", [dict(flops=0.6), dict(sparsity=0.5)])
def test_zero_init_last_bn_plan_is_not_index_ordered(budget, caplog):
    """Random timm weights zero-initialise each block's last BN, so every block's inner
    channels score 0. They are ranked by weight norm: no group keeps its last indices."""
    model = make(zero_init=("block1", "block2"))
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        res = compile_quiet(model, "oba", batches(model), **budget)
    assert any("2 of 3 prunable groups tie" in n for n in res.report.notes)
    for name in ("block1.conv1", "block2.conv1"):
        g = group_of(model, name)
        kept = res.plan.kept[g.id]
        assert 1 <= len(kept) < g.size
        assert kept != list(range(g.size - len(kept), g.size))
        assert kept == kept_by_norm(model, g.id, len(kept))
