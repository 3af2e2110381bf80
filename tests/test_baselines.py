"""Taylor and OBD baselines against brute force (design §5.4), and the registry."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.criteria import ScoringContext, get_criterion, list_criteria
from fxprune.criteria.aggregate import channel_scores
from fxprune.criteria.baselines import obd_scores
from fxprune.criteria.scoring import make_scoring_copy
from fxprune.errors import CriterionError, DataError
from fxprune.passes.trace import trace

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Res(nn.Module):
    """conv-BN-ReLU stem, one identity residual block, pooled Linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.a1, self.an1 = nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.a2, self.an2 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.an2(self.a2(F.relu(self.an1(self.a1(x))))))
        return self.fc(x.mean((2, 3)))


def setup(seed=0):
    torch.manual_seed(seed)
    model = Res().double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    gen = torch.Generator().manual_seed(1)
    batches = [((torch.randn(3, 2, 5, 5, generator=gen, dtype=D),),
                torch.randint(0, 3, (3,), generator=gen)) for _ in range(2)]
    x = batches[0][0][0]
    groups = fxprune.groups(model, x)
    ctx = ScoringContext(make_scoring_copy(trace(model, x)), groups, batches, None)
    return model, batches, groups, ctx


def channel_sum(group, c, per_param):
    """Σ over every member slice of channel c (all roles) of per-parameter values."""
    total = torch.zeros((), dtype=D)
    for m in group.members:
        if m.target in per_param:
            total = total + per_param[m.target].movedim(m.dim, 0)[list(m.index_map[c])].sum()
    return total


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_taylor_equals_brute_force():
    model, batches, groups, ctx = setup()
    params = get_criterion("taylor").score(ctx)
    got = channel_scores(groups, params)              # design §5.5 default aggregation
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for (x,), y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            grads[n] += p.grad / len(batches)
    theta_g = {n: p.detach() * grads[n] for n, p in model.named_parameters()}
    for n in theta_g:
        assert rel(params[n], theta_g[n]) <= 1e-10
    for gr in groups:
        ref = torch.stack([channel_sum(gr, c, theta_g).abs() for c in range(gr.size)])
        assert rel(got[gr.id], ref) <= 1e-10, gr.id


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
def test_obd_equals_brute_force_diagonal_fisher(per_sample):
    model, batches, groups, ctx = setup()
    ctx.options["per_sample"] = per_sample
    ctx.options["chunk"] = 2                         # chunks that split a batch
    crit = get_criterion("obd")
    params = crit.score(ctx)
    got = channel_scores(groups, params)
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for (x,), y in batches:
        for k in range(x.shape[0]):
            model.zero_grad()
            F.cross_entropy(model(x[k:k + 1]), y[k:k + 1]).backward()
            for n, p in model.named_parameters():
                fisher[n] += p.grad ** 2
            count += 1
    ref_param = {n: 0.5 * p.detach() ** 2 * fisher[n] / count
                 for n, p in model.named_parameters()}
    for n in ref_param:
        assert rel(params[n], ref_param[n]) <= 1e-10, n
    for gr in groups:
        ref = torch.stack([channel_sum(gr, c, ref_param).abs() for c in range(gr.size)])
        assert rel(got[gr.id], ref) <= 1e-10, gr.id


def test_obd_rejects_bad_option_and_reports_nan():
    _, batches, groups, ctx = setup()
    with pytest.raises(CriterionError, match="per_sample"):
        obd_scores(ctx.module, batches, per_sample="bogus")
    (x,), y = batches[1]
    ctx.batches = batches[:1] + [((x * float("nan"),), y)]
    for name in ("obd", "taylor"):
        with pytest.raises(DataError, match="batch 1"):
            get_criterion(name).score(ctx)


def test_untrained_float32_model():
    from fxprune.models import create_model
    torch.manual_seed(0)
    model = create_model("tiny_vgg", num_classes=4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    groups = fxprune.groups(model, x)
    for name in ("taylor", "obd"):
        ctx = ScoringContext(make_scoring_copy(trace(model, x)), groups, [((x,), y)], None)
        params = get_criterion(name).score(ctx)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all()
                   for p in params.values())
        assert any(p.abs().sum() > 0 for p in params.values())


def test_every_criterion_has_a_one_line_description():
    names = list_criteria()
    for expected in ("l1", "l2", "random", "taylor", "obd", "sosp-h", "sosp-i"):
        assert expected in names
    for name, text in names.items():
        assert text and "\n" not in text, name
        assert get_criterion(name).name == name
