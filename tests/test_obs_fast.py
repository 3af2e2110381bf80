"""The fast paths of ``criterion="obs"`` (issue 12, scoring cost), against the plain forms.

float64 (tight tolerance): the Gram's upper panels (``lstsq.gram_panels``), assembled, equal
``x̃ᵀx̃`` with the 1 column concatenated; the greedy's symmetric block fold, its run-wise
column selection (few and many runs) and its QR compression of a weight with more rows
than columns give the plain loop's order and increases (the oracle of
``test_obs_greedy.py``). float32 (option ``precision="float32"``): the inverse is close
to float64's, a float32 Cholesky failure falls back to float64, and the greedy's order
stays close to float64's (Spearman of the removal positions); the option is validated.
"""
import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import CriterionError
from fxprune.models import create_model
from fxprune.models.registry import model_input_size
from fxprune.passes import lstsq, obs_solve
from fxprune.passes.lstsq import LayerGram, augmented_gram, gram_panels, layer_rows
from fxprune.passes.obs_solve import damped_inverse, greedy_removal, remove_columns, removal_errors

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _plain_greedy(Hinv, W, units):
    """The oracle loop: every unit's error from the full downdated inverse each step."""
    remaining, order, increases = list(range(len(units))), [], []
    while remaining:
        errs = removal_errors(Hinv, W, [units[u] for u in remaining])
        k = int(torch.argsort(errs, stable=True)[0])
        order.append(remaining[k])
        increases.append(float(errs[k]))
        del remaining[k]
        if remaining:
            W, Hinv = remove_columns(W, Hinv, units[order[-1]])
    return order, increases


def _problem(d, o, sizes, seed=0, rows=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows or 3 * d, d, generator=g, dtype=DT)
    X[:, 1] = X[:, 0] + 1e-2 * X[:, 1]
    W = torch.randn(o, d, generator=g, dtype=DT)
    units, start = [], 0
    for s in sizes:
        units.append(torch.arange(start, start + s))
        start += s
    perm = torch.randperm(len(units), generator=g).tolist()
    return X.T @ X, W, [units[i] for i in perm]


def _assert_greedy_matches_the_plain_loop(H, W, units):
    Hinv = damped_inverse(H, 1e-2)
    order, inc = greedy_removal(Hinv, W, units)
    ref_order, ref_inc = _plain_greedy(Hinv, W, units)
    assert order == ref_order
    assert inc == pytest.approx(ref_inc, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("d,groups,rows", [(7, 1, 3), (40, 1, 3), (40, 2, 7), (41, 1, 7),
                                            (39, 1, 8)])
def test_gram_panels_equal_the_concatenated_product(monkeypatch, d, groups, rows):
    """Panels of ``rows`` rows (the last one holding the 1 row alone when rows divides d+1,
    or sharing it), assembled, are the full product; they store the upper part only."""
    monkeypatch.setattr(lstsq, "GRAM_BLOCK_MIN", 8)
    monkeypatch.setattr(lstsq, "GRAM_PANEL_ROWS", rows)
    cols = torch.randn(groups, 50, d, dtype=DT)
    x1 = torch.cat([cols, torch.ones_like(cols[..., :1])], dim=-1)
    full = torch.bmm(x1.transpose(1, 2), x1)
    torch.testing.assert_close(augmented_gram(cols), full, rtol=1e-12, atol=1e-12)
    panels, n = gram_panels(cols), d + 1
    if d >= 8:
        assert len(panels) == -(-n // rows)
        assert sum(p[0].numel() for p in panels) < 0.5 * n * n + n * rows
    first = 0
    for p in panels:  # each panel is rows first:end, columns first: of the full matrix
        end = first + p.shape[1]
        torch.testing.assert_close(p, full[:, first:end, first:], rtol=1e-12, atol=1e-12)
        first = end
    assert first == n


def test_gram_without_cross_term_has_the_same_h():
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    a, b = LayerGram(), LayerGram()
    with torch.no_grad():
        for g, cross in ((a, True), (b, False)):
            g.add(conv, x, conv(x), cross=cross)
            g.add(conv, x + 1, conv(x + 1), cross=cross)
    cols, _ = layer_rows(conv, torch.cat([x, x + 1]), conv(torch.cat([x, x + 1])).detach())
    x1 = torch.cat([cols, torch.ones_like(cols[..., :1])], dim=-1)
    torch.testing.assert_close(b.H, torch.bmm(x1.transpose(1, 2), x1), rtol=1e-12, atol=1e-10)
    assert torch.equal(a.H, b.H) and b.C is None and a.yy == b.yy and a.rows == b.rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_handing_over_the_gram_and_the_inverse_changes_nothing(dtype):
    """obs hands its assembled Gram to ``damped_inverse`` and the inverse to the greedy
    (``overwrite=True``: no copies): same inverse and same greedy, bit for bit."""
    H, W, units = _problem(31, 5, [1, 2, 3] * 5 + [1], seed=3)
    ref_inv = damped_inverse(H, 1e-2, dtype)
    given = H.clone()
    got_inv = damped_inverse(given, 1e-2, dtype, overwrite=True)
    assert torch.equal(got_inv, ref_inv)
    ref = greedy_removal(ref_inv.clone(), W, units)
    assert greedy_removal(got_inv, W, units, overwrite=True) == ref
    view = H.clone()[:-1, :-1]  # obs without a bias: the Gram's leading block, a view
    assert torch.equal(damped_inverse(view, 1e-2, dtype, overwrite=True),
                       damped_inverse(H[:-1, :-1].contiguous(), 1e-2, dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damp,images", [(1e-2, 3), (0.0, 1)])  # 0, 16 rows: singular
def test_inverse_from_the_panels_equals_the_full_matrix_path(monkeypatch, dtype, bias,
                                                             damp, images):
    """obs assembles ``H + λI`` from the stored panels straight in the solve's dtype;
    bit for bit what ``damped_inverse`` gives on the full matrix (its fallbacks too)."""
    from fxprune.criteria.obs import _layer_inverse
    monkeypatch.setattr(lstsq, "GRAM_BLOCK_MIN", 8)
    monkeypatch.setattr(lstsq, "GRAM_PANEL_ROWS", 5)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, bias=bias).double()
    x = torch.randn(images, 4, 6, 6, dtype=DT)
    gram = LayerGram()
    with torch.no_grad():
        gram.add(conv, x, conv(x), cross=False)
    assert len(gram.panels) == 8  # d + 1 = 37 in panels of 5 rows
    H = gram.H[0] if bias else gram.H[0][:-1, :-1]
    assert torch.equal(_layer_inverse(gram, bias, damp, dtype), damped_inverse(H, damp, dtype))


@pytest.mark.parametrize("sizes,flush", [([1] * 40, 4), ([2, 3, 1, 2] * 5, 3), ([1] * 40, 1000)])
def test_symmetric_fold_and_run_selection_equal_the_plain_loop(monkeypatch, sizes, flush):
    monkeypatch.setattr(obs_solve, "SYM_BLOCK_MIN", 4)
    monkeypatch.setattr(obs_solve, "SYM_BLOCKS", 3)
    monkeypatch.setattr(obs_solve, "FLUSH_COLUMNS", flush)
    H, W, units = _problem(sum(sizes) + 1, 6, sizes, seed=flush)
    _assert_greedy_matches_the_plain_loop(H, W, units)


def test_select_columns_with_many_runs_and_with_few():
    T = torch.randn(3, 200, dtype=DT)
    many = torch.arange(0, 200, 2)                  # 100 runs: index_select
    few = torch.cat([torch.arange(3, 50), torch.arange(60, 61), torch.arange(90, 200)])
    for idx in (many, few, torch.arange(0), torch.arange(200)):
        assert torch.equal(obs_solve._select_columns(T, idx), T[:, idx])


def test_qr_compression_of_a_tall_weight_keeps_the_greedy(monkeypatch):
    monkeypatch.setattr(obs_solve, "FLUSH_COLUMNS", 5)
    H, W, units = _problem(13, 40, [1, 2, 1, 3, 1, 1, 2, 1], seed=4)   # o = 40 > d = 13
    _assert_greedy_matches_the_plain_loop(H, W, units)


def test_float32_inverse_is_close_and_falls_back_to_float64():
    H, _, _ = _problem(60, 4, [1] * 60, seed=2)
    inv32, inv64 = damped_inverse(H, 1e-2, torch.float32), damped_inverse(H, 1e-2)
    assert inv32.dtype == torch.float32
    torch.testing.assert_close(inv32.double(), inv64, rtol=1e-3, atol=1e-3 * float(inv64.abs().max()))
    # rank-1 H with a damping below float32's resolution: the float32 Cholesky fails
    v = torch.randn(30, 1, dtype=DT)
    bad = 1e12 * (v @ v.T)
    out = damped_inverse(bad, 1e-12, torch.float32)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, damped_inverse(bad, 1e-12))


def _positions(order):
    pos = torch.empty(len(order), dtype=DT)
    pos[torch.as_tensor(order)] = torch.arange(len(order), dtype=DT)
    return pos


def test_float32_greedy_ranks_close_to_float64():
    H, W, units = _problem(161, 24, [1] * 80 + [2] * 40, seed=7, rows=400)
    order64, inc64 = greedy_removal(damped_inverse(H, 1e-2), W, units)
    order32, inc32 = greedy_removal(damped_inverse(H, 1e-2, torch.float32), W.float(), units)
    assert sorted(order32) == list(range(len(units)))
    p64, p32 = _positions(order64), _positions(order32)
    spearman = float(torch.corrcoef(torch.stack([p64, p32]))[0, 1])
    assert spearman > 0.99
    assert sum(inc32) == pytest.approx(sum(inc64), rel=1e-3)


def test_precision_option_scores_and_is_validated():
    model = create_model("tiny_resnet").double().eval()
    x = torch.randn(4, *model_input_size("tiny_resnet"), dtype=DT)
    data = [(x, torch.randint(0, 10, (4,)))]
    s64 = fxprune.saliency(model, "obs", data=data)
    s32 = fxprune.saliency(model, "obs", data=data, precision="float32")
    for g, v in s64.groups.items():
        assert s32.groups[g].dtype == v.dtype
        torch.testing.assert_close(s32.groups[g], v, rtol=1e-2, atol=1e-3 * float(v.abs().max()))
    with pytest.raises(CriterionError, match="precision"):
        fxprune.saliency(model, "obs", data=data, precision="float16")


def test_both_inverse_routes_agree():
    """One thread: ``cholesky_inverse``; more: ``cholesky_solve(I)`` (slow potri under
    load with several threads); same inverse."""
    H, _, _ = _problem(50, 4, [1] * 50, seed=3)
    one = damped_inverse(H, 1e-2)
    torch.set_num_threads(2)
    try:
        two = damped_inverse(H, 1e-2)
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(one, two, rtol=1e-10, atol=1e-12)
    lam = 1e-2 * float(torch.diagonal(H).mean())
    torch.testing.assert_close(one @ (H + lam * torch.eye(50, dtype=DT)), torch.eye(50, dtype=DT),
                               rtol=0, atol=1e-9)
