"""The cheaper parts of compile (issue 17): exact finiteness checks, l2's aggregation once
per (tensor, dim), and verification on the analysed graph itself (float64 oracles)."""
import pytest
import torch

import fxprune
from fxprune.criteria import aggregate
from fxprune.criteria.aggregate import channel_scores, root_of_sum
from fxprune.criteria.magnitude import LazyScores, _l2_aggregate, _squares_finite, all_finite
from fxprune.models import create_model, list_models, model_input_size
from fxprune.passes.count import count_flops
from fxprune.passes.frontend import capture
from fxprune.passes.groups import analyze
from fxprune.passes.rewrite import rewrite
from fxprune.passes import verify
from fxprune.passes.verify import check, masked_reference, verify_rewrite

D = torch.float64
FIXTURES = [n for n in list_models() if n.startswith("tiny_")]


def fixture(name):
    torch.manual_seed(0)
    model = create_model(name).double().eval()
    return model, torch.randn(2, *model_input_size(name), dtype=D)


def half_plan(analysis):
    """Every prunable group keeps its odd channels (at least one)."""
    return {g.id: list(range(1, g.size, 2)) or [0] for g in analysis.groups if g.prunable}


# ----------------------------------------------------------------------------- finiteness
@pytest.mark.parametrize("values, expected", [
    ([1.0, -2.0], True), ([1.0, float("nan")], False), ([float("inf"), 1.0], False),
    ([float("inf"), -float("inf")], False), ([-float("inf")], False), ([], True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, D])
def test_all_finite_is_isfinite_all(values, expected, dtype):
    t = torch.tensor(values, dtype=dtype)
    assert all_finite(t) is expected is bool(torch.isfinite(t).all())


def test_all_finite_when_the_sum_overflows():
    """Finite entries whose sum overflows: the sum alone would say "not finite"."""
    for t in (torch.full((4,), 60000.0, dtype=torch.float16),
              torch.full((4,), 3e38, dtype=torch.float32)):
        assert not torch.isfinite(t.sum())
        assert all_finite(t)
    assert not all_finite(torch.tensor([3e38, 3e38, float("nan")]))


@pytest.mark.parametrize("values", [[1.0, -3.0], [1e20, 0.0], [-1e20], [1.8e19, -1.8e19],
                                    [float("nan"), 1.0], [float("inf")], [0.0]])
def test_lazy_finiteness_equals_the_materialised_score(values):
    p = torch.tensor(values, dtype=torch.float32)
    for fn, rule in ((lambda t: t.pow(2), _squares_finite), (torch.abs, all_finite)):
        scores = LazyScores({"w": p}, fn, finite=rule)
        assert scores.finite("w") is bool(torch.isfinite(fn(p)).all())
        assert LazyScores({"w": p}, fn).finite("w") is scores.finite("w")


def test_l2_score_overflow_names_the_parameter():
    """Finite weights whose squares overflow (float32): the finiteness check, which no
    longer materialises the squares, still refuses and names the parameter."""
    model, x = fixture("tiny_vgg")
    model = model.float()
    with torch.no_grad():
        model.features[0][0].weight[0, 0, 0, 0] = 1e20
    with pytest.raises(fxprune.FxpruneError, match=r"features\.0\.0\.weight"):
        fxprune.compile(model, "l2", example_inputs=x.float(), flops=0.5, progress=False)


# ----------------------------------------------------------------------------- l2
@pytest.mark.parametrize("name", FIXTURES)
def test_l2_aggregate_equals_the_generic_aggregation(name):
    """Once per (tensor, dim) with precomputed sums = the per-member signed sums of
    :func:`channel_scores` (concat offsets, head index maps, flatten columns, ties)."""
    model, x = fixture(name)
    analysis = analyze(capture(model, (x,)))
    squares = {n: p.detach().pow(2) for n, p in analysis.gm.named_parameters()}
    fast = _l2_aggregate(analysis.groups, squares, None)
    slow = channel_scores(analysis.groups, squares, transform=root_of_sum)
    assert set(fast) == set(slow)
    for gid in slow:
        assert fast[gid].dtype == slow[gid].dtype
        torch.testing.assert_close(fast[gid], slow[gid], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", FIXTURES)
def test_tiebreak_weight_norms_equal_the_aggregate_ones(name):
    model, x = fixture(name)
    model = model.float()  # float32 weights: the norms are still float64
    analysis = analyze(capture(model, (x.float(),)))
    # the generic per-member aggregation of float64 squares is the reference
    squares = {n: p.detach().double().pow(2) for n, p in analysis.gm.named_parameters()}
    fast = aggregate.weight_norms(analysis.groups, analysis.gm)
    slow = channel_scores(analysis.groups, squares, transform=root_of_sum)
    assert set(fast) == set(slow)
    for gid in slow:
        assert fast[gid].dtype == slow[gid].dtype == D
        torch.testing.assert_close(fast[gid], slow[gid], rtol=1e-12, atol=0)


def test_lazy_scores_membership_computes_nothing():
    calls = []
    scores = LazyScores({"w": torch.ones(3)}, lambda p: calls.append(1) or p)
    assert "w" in scores and "v" not in scores and not calls


# ----------------------------------------------------------------------------- verification
@pytest.mark.parametrize("name", ["tiny_vit", "tiny_convnext", "tiny_attention", "tiny_resnet",
                                  "tiny_densenet", "tiny_split"])
def test_verification_on_the_analysed_graph(name):
    """The interpreter-run reference (masked statistics called in place, no graph copy)
    equals the masked reference copy; the analysed graph, its code and its modules'
    training flags are left as they were; a wrong slim model is refused."""
    model, x = fixture(name)
    analysis = analyze(capture(model, (x,), share_params=True, lazy=False))
    kept = half_plan(analysis)
    slim = rewrite(analysis, kept)
    code, nodes = analysis.gm.code, len(analysis.gm.graph.nodes)
    some = list(analysis.gm.modules())[1]
    some.train()  # a mixed set of flags must come back mixed
    lean = verify_rewrite(analysis, slim, kept, (x,))
    assert lean == pytest.approx(check(slim, masked_reference(analysis, kept), (x,)), abs=1e-12)
    assert lean < 1e-6
    assert analysis.gm.code == code and len(analysis.gm.graph.nodes) == nodes
    assert some.training and not analysis.gm.training
    with torch.no_grad():
        next(p for p in slim.parameters() if p.dim() > 1).mul_(1.5)
    with pytest.raises(fxprune.FxpruneError, match="verification failed"):
        verify_rewrite(analysis, slim, kept, (x,))


def test_pruned_layer_norm_stream_needs_the_masked_statistics(monkeypatch):
    """ViT residual stream pruned: the reference's LayerNorms take their statistics over
    the kept channels. Without that (a plain masked copy) the slim model would differ,
    so the in-place masked statistics are what makes the check pass."""
    model, x = fixture("tiny_vit")
    analysis = analyze(capture(model, (x,), share_params=True, lazy=False))
    kept = half_plan(analysis)
    assert any(g.prunable and any("norm" in m.target for m in g.members)
               for g in analysis.groups if g.id in kept)
    slim = rewrite(analysis, kept)
    assert verify_rewrite(analysis, slim, kept, (x,)) < 1e-6
    monkeypatch.setattr(verify, "_statistic_calls", lambda gm, keep: {})
    with pytest.raises(fxprune.FxpruneError, match="verification failed"):
        verify_rewrite(analysis, slim, kept, (x,))


# ----------------------------------------------------------------------------- report FLOPs
@pytest.mark.parametrize("name", ["tiny_vit", "tiny_resnet", "tiny_flatten", "tiny_split"])
def test_report_flops_per_example_from_propagated_shapes(name):
    """A batch of 3: the report counts one example from shapes propagated on it (not a
    counted run on fake tensors) -- the same numbers -- and the slim model keeps the
    shapes recorded on the batch."""
    model, _ = fixture(name)
    x = torch.randn(3, *model_input_size(name), dtype=D)
    res = fxprune.compile(model, "l2", example_inputs=x, flops=0.6, progress=False)
    assert res.report.flops_before == count_flops(model, (x[:1],))
    assert res.report.flops_after == count_flops(res.module, (x[:1],))
    shapes = [n.meta["tensor_meta"].shape for n in res.module.graph.nodes
              if n.op == "placeholder"]
    assert shapes and all(s[0] == 3 for s in shapes)
