"""Gradual pruning on channel masks, ``compile(steps=N)`` (issue 12, item 3)."""
import copy
import json
import math

import pytest
import torch

import fxprune
from fxprune.api_gradual import layer_means
from fxprune.api_score import score_analysis, wrap_loss
from fxprune.criteria import get_criterion
from fxprune.models import create_model, model_input_size
from fxprune.passes.gradual import Gradual, masked_analysis, prune_gradually, schedule
from fxprune.passes.groups import analyze
from fxprune.passes.rewrite import rewrite
from fxprune.passes.select import Budget, removable_counts
from fxprune.passes.trace import trace
from fxprune.passes.verify import check, masked_reference
from fxprune.passes.widths import unit_step



def fixture(name):
    """A float64 eval-mode fixture with non-trivial BN statistics, and an input batch."""
    torch.manual_seed(0)
    model = create_model(name).double().eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
    return model, torch.randn(3, *model_input_size(name), dtype=torch.float64)


def batches_for(x, n=2, classes=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xb = torch.randn(x.shape, dtype=x.dtype, generator=gen)
        out.append(((xb,), torch.randint(0, classes, (x.shape[0],), generator=gen)))
    return out


def iterative_equivalent(model, x, criterion, ratio, n, **kw):
    """(mask-based steps=n plan, rewrite-based iterative plan on the same schedule)."""
    ratios = [b.ratio for b in schedule(Budget("flops", ratio), n)]
    masked = fxprune.compile(model, criterion, example_inputs=x, flops=ratio, steps=n,
                             repair=None, **kw)
    rewritten = fxprune.compile(model, criterion, example_inputs=x, flops=ratios,
                                repair=None, **kw)
    return masked, rewritten


@pytest.mark.parametrize("name, normalize", [
    ("tiny_resnet", "mean"), ("tiny_densenet", "mean"), ("tiny_vit", "mean"),
    ("tiny_se", "max"), ("tiny_resnet", "max"), ("tiny_vit", None)])
def test_masked_steps_equal_rewrite_iterative_mode(name, normalize):
    """Given the same (deterministic, l2) scores, N mask-based steps on one graph give the
    plan of N rewrite / re-trace / re-analysis steps on the same schedule."""
    model, x = fixture(name)
    masked, rewritten = iterative_equivalent(model, x, "l2", 0.45, 4, normalize=normalize)
    assert masked.plan.kept == rewritten.plan.kept
    assert masked.report.flops_ratio == pytest.approx(rewritten.report.flops_ratio, abs=1e-12)
    assert masked.report.max_rel_error <= 1e-6


def test_masked_model_scores_equal_the_slim_models():
    """The oracle behind the procedure: OBA on the masked dense model gives the kept
    channels the scores OBA gives the rewritten (slim, re-analysed) model."""
    model, x = fixture("tiny_resnet")
    data = batches_for(x, classes=10)
    dense = analyze(trace(model, (x,)))
    plan = fxprune.compile(model, "l2", example_inputs=x, flops=0.6, repair=None).plan.kept
    crit, loss = get_criterion("oba"), wrap_loss(None, None)
    on_mask = score_analysis(masked_analysis(dense, plan), crit, data, loss, {}, False).groups
    slim = analyze(trace(rewrite(dense, plan), (x,)))
    on_slim = score_analysis(slim, crit, data, loss, {}, False).groups
    for g in slim.groups:
        if g.id in plan:
            torch.testing.assert_close(on_mask[g.id][plan[g.id]], on_slim[g.id],
                                       rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # ~30 s on a loaded machine
def test_data_driven_steps_equal_rewrite_iterative_mode():
    model, x = fixture("tiny_resnet")
    masked, rewritten = iterative_equivalent(model, x, "oba", 0.5, 3,
                                             data=batches_for(x, classes=10))
    assert masked.plan.kept == rewritten.plan.kept


def test_schedule_is_exponential_and_ends_exactly_at_the_budget():
    steps = schedule(Budget("flops", 0.3), 50)
    ratios = [s.ratio for s in steps]
    assert len(ratios) == 50 and ratios[-1] == 0.3 and all(s.kind == "flops" for s in steps)
    factors = [b / a for a, b in zip([1.0] + ratios, ratios)]
    assert factors == pytest.approx([0.3 ** (1 / 50)] * 50, rel=1e-12)
    assert schedule(Budget("params", 0.5), 1)[0].ratio == 0.5
    with pytest.raises(fxprune.BudgetError, match="flops=r or params=r"):
        schedule(Budget("sparsity", 0.5), 3)


def test_each_step_meets_its_target_on_the_cumulative_mask():
    """Every scoring call sees a plan within the previous step's target, removed
    channels never return, and the final plan meets the budget."""
    model, x = fixture("tiny_resnet")
    dense = analyze(trace(model, (x,)))
    from fxprune.passes.count import cost_model
    cost_m = cost_model(dense, (x,))
    groups = [g for g in dense.groups if g.prunable]
    caps = removable_counts(groups, 0.95)
    cost = lambda kept: cost_m.flops(dense.keep_mask(kept)) / cost_m.dense_flops
    seen = []

    def score(masked, kept):
        seen.append({g: list(k) for g, k in kept.items()})
        return {g.id: torch.rand(g.size, dtype=torch.float64) for g in groups}, None

    n = 6
    kept = prune_gradually(dense, groups, Budget("flops", 0.35), Gradual(n), score,
                           lambda k: cost(k) * cost_m.dense_flops, cost_m.dense_flops, caps, 0.95)
    targets = [1.0] + [0.35 ** (k / n) for k in range(1, n)]
    assert len(seen) == n
    for plan, target in zip(seen, targets):
        assert cost(plan) <= target * (1 + 1e-9)
    for before, after in zip(seen + [kept], seen[1:] + [kept]):
        assert all(set(after[g]) <= set(before[g]) for g in before)
    assert 0.33 < cost(kept) <= 0.35 * (1 + 1e-9)


def test_final_slim_model_verified_and_user_model_untouched():
    model, x = fixture("tiny_vit")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxprune.compile(model, "taylor", data=batches_for(x, classes=10), flops=0.5,
                          steps=Gradual(4, bn_train=True, layer_mean=True), repair=None)
    assert not model.training
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert res.report.flops_ratio <= 0.5 and res.report.max_rel_error <= 1e-6
    # an independent check of the one rewrite against the masked dense model
    dense = analyze(trace(model, (x,)))
    assert check(res.module, masked_reference(dense, res.plan.kept), (x,)) <= 1e-6


@pytest.mark.parametrize("name, normalize", [
    ("tiny_resnet", None), ("tiny_densenet", "mean"), ("tiny_vit", None)])
def test_cost_aware_steps_equal_rewrite_iterative_mode(name, normalize):
    """Cost-aware steps divide by what a channel saves from the plan so far: the savings
    the rewrite-based iterative mode measures on its slim model (same plan, and not the
    plain ranking's)."""
    model, x = fixture(name)
    masked, rewritten = iterative_equivalent(model, x, "l2", 0.45, 4, normalize=normalize,
                                             cost_aware=True)
    assert masked.plan.meta["cost_aware"] is True
    assert masked.plan.kept == rewritten.plan.kept
    plain, _ = iterative_equivalent(model, x, "l2", 0.45, 4, normalize=normalize)
    assert plain.plan.kept != masked.plan.kept
    assert masked.report.max_rel_error <= 1e-6


@pytest.mark.parametrize("name, round_to, ratio, n", [
    ("tiny_resnet", 4, 0.3, 6), ("tiny_vit", 8, 0.75, 3), ("tiny_vit", 4, 0.45, 3),
    ("tiny_mobilenet", 4, 0.45, 6), ("tiny_densenet", 4, 0.6, 4)])
def test_round_to_steps_equal_rewrite_iterative_mode(name, round_to, ratio, n):
    """Each step rounds its share as the iterative mode rounds its slim model (relative
    to what earlier steps left, which the first four cases need): the same plan, every
    group that lost channels keeping a multiple of its unit step."""
    model, x = fixture(name)
    masked, rewritten = iterative_equivalent(model, x, "l2", ratio, n, round_to=round_to)
    assert masked.plan.kept == rewritten.plan.kept
    assert masked.plan.kept != iterative_equivalent(model, x, "l2", ratio, n)[0].plan.kept
    dense = {g.id: g for g in fxprune.groups(model, x)}
    for gid, chans in masked.plan.kept.items():
        g = dense[gid]
        assert len(chans) == g.size or len(chans) % unit_step(g, round_to) == 0, gid
    assert masked.report.flops_ratio <= ratio + 1e-9 and masked.report.max_rel_error <= 1e-6


@pytest.mark.parametrize("criterion, cost_aware", [("l2", False), ("taylor", False),
                                                   ("l2", True)])
def test_one_step_equals_one_shot(criterion, cost_aware):
    model, x = fixture("tiny_resnet")
    data = batches_for(x, classes=10) if criterion == "taylor" else None
    kw = dict(example_inputs=x, data=data, flops=0.5, repair=None, cost_aware=cost_aware)
    one = fxprune.compile(model, criterion, steps=1, **kw)
    shot = fxprune.compile(model, criterion, **kw)
    assert one.plan.kept == shot.plan.kept
    torch.testing.assert_close(one.module(x), shot.module(x), rtol=0, atol=0)


def test_bn_train_scores_with_batch_statistics_and_stays_exact():
    model, x = fixture("tiny_resnet")
    dense = analyze(trace(model, (x,)))
    plan = fxprune.compile(model, "l2", example_inputs=x, flops=0.6, repair=None).plan.kept
    train = masked_analysis(dense, plan, bn_train=True).gm.eval()
    # reference: the slim model with its batch norms in train mode on a copy
    slim = copy.deepcopy(rewrite(dense, plan)).train()
    with torch.no_grad():
        out = train(x)
        torch.testing.assert_close(out, slim(x), rtol=1e-9, atol=1e-12)
        assert not torch.allclose(out, masked_reference(dense, plan)(x))
    running = dict(dense.gm.named_buffers())
    assert all(v is not None for v in running.values())  # the dense analysis keeps its stats


def test_layer_mean_divides_by_the_groups_nonzero_members():
    model, x = fixture("tiny_densenet")
    dense = analyze(trace(model, (x,)))
    groups = [g for g in dense.groups if g.prunable]
    data = batches_for(x, classes=10)
    sal = score_analysis(dense, get_criterion("taylor"), data, wrap_loss(None, None), {}, False)
    # drop a channel range so that some member covers removed channels only
    kept = {g.id: list(range(g.size // 2, g.size)) for g in groups}
    out = layer_means(groups, sal.parameters, sal.groups, kept)
    for g in groups:
        live = 0
        for m in g.members:
            score = sal.parameters.get(m.target)
            if score is None:
                continue
            sums = [float(score.index_select(m.dim, torch.as_tensor(m.index_map[c])).sum())
                    if m.index_map[c] else 0.0 for c in kept[g.id]]
            live += any(s != 0.0 for s in sums)
        torch.testing.assert_close(out[g.id], sal.groups[g.id] / max(live, 1))


def test_layer_mean_cancels_under_group_normalisers():
    model, x = fixture("tiny_resnet")
    kw = dict(data=batches_for(x, classes=10), flops=0.5, repair=None, normalize="max")
    plain = fxprune.compile(model, "taylor", steps=3, **kw)
    mean = fxprune.compile(model, "taylor", steps=Gradual(3, layer_mean=True), **kw)
    assert plain.plan.kept == mean.plan.kept


@pytest.mark.parametrize("kw, error, needle", [
    (dict(flops=[0.8, 0.5], steps=3), fxprune.BudgetError, "one budget"),
    (dict(flops=0.5, steps=3, between_steps=lambda m, s: None), fxprune.BudgetError, "between_steps"),
    (dict(sparsity=0.5, steps=3), fxprune.BudgetError, "flops=r or params=r"),
    (dict(flops=0.5, steps=0), fxprune.BudgetError, "positive integer"),
    (dict(flops=0.5, steps=2.5), fxprune.BudgetError, "positive integer"),
])
def test_bad_steps_fail_closed(kw, error, needle):
    model, x = fixture("tiny_mlp")
    with pytest.raises(error, match=needle):
        fxprune.compile(model, "l2", example_inputs=x, **kw)


def test_greedy_criterion_refused():
    model, x = fixture("tiny_mlp")
    with pytest.raises(fxprune.CriterionError, match="greedy"):
        fxprune.compile(model, "sosp-i", data=batches_for(x, classes=10), flops=0.5, steps=3)


def test_cli_prune_steps(tmp_path, monkeypatch, capsys):
    from fxprune.cli import main
    monkeypatch.chdir(tmp_path)
    code = main(["prune", "tiny_resnet", "--criterion", "l2", "--flops", "0.5", "--steps", "3",
                 "--no-measure-latency", "--plan", "plan.json"])
    assert code in (0, None)
    plan = json.loads((tmp_path / "plan.json").read_text())
    report = plan["meta"]["report"]
    assert report["flops_after"] <= 0.5 * report["flops_before"]
    torch.manual_seed(0)
    direct = fxprune.compile(create_model("tiny_resnet"), "l2", flops=0.5, steps=3,
                             example_inputs=torch.randn(1, *model_input_size("tiny_resnet")))
    assert math.isclose(direct.report.flops_ratio, report["flops_after"] / report["flops_before"],
                        rel_tol=0.05)


def test_tied_group_is_reported_once_not_per_step(caplog):
    """A group whose channels all tie is warned about on the first scored step, not on
    each of the N steps; the report holds one note for it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()
    with torch.no_grad():   # every channel of the first conv's group weighs the same
        model[0].weight.fill_(0.1)
        model[0].bias.fill_(0.0)
        model[2].weight.fill_(0.1)
    x = torch.randn(2, 3, 6, 6)
    with caplog.at_level("WARNING", logger="fxprune"):
        res = fxprune.compile(model, "l2", example_inputs=x, flops=0.4, steps=6, repair=None)
    warned = [r for r in caplog.records if "tie" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    tie_notes = [n for n in res.report.notes if "tie" in n]
    assert 1 <= len(tie_notes) <= 2 and "steps with ties" in tie_notes[0]
