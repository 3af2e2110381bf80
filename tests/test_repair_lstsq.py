"""Oracles for the repair pass' least squares (passes/lstsq.py), in float64.

The Gram-based solve is checked against independent computations: an explicit
stacked least-squares problem for Linear, and the optimality condition (the gradient
of the damped objective, computed by autograd through ``F.conv2d`` itself, is zero)
for convolutions, so the unfold layout is checked too.
"""
import pytest
import torch
from torch import nn

from fxprune.passes.lstsq import (LayerGram, augmented_weight, error, layer_rows,
                                    set_augmented_weight, solve)

pytestmark = pytest.mark.usefixtures("one_thread")


def _gram(layer, xs, ys):
    g = LayerGram()
    for x, y in zip(xs, ys):
        g.add(layer, x, y)
    return g


@pytest.mark.parametrize("alpha", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_solve_equals_stacked_lstsq(alpha, bias):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=bias).double()
    xs = [torch.randn(7, 4, 5, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(7, 4, 3, dtype=torch.float64) for _ in range(2)]
    gram = _gram(layer, xs, ys)
    w0 = augmented_weight(layer)
    got = solve(gram, w0, alpha, has_bias=bias)[0]
    X = torch.cat([x.reshape(-1, 5) for x in xs])
    Y = torch.cat([y.reshape(-1, 3) for y in ys])
    if bias:
        X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    W0 = w0[0] if bias else w0[0, :, :-1]
    lam = alpha * float((X * X).sum(0).mean())
    A = torch.cat([X, lam ** 0.5 * torch.eye(X.shape[1], dtype=X.dtype)])
    B = torch.cat([Y, lam ** 0.5 * W0.T])
    want = torch.linalg.lstsq(A, B).solution.T
    if not bias:
        want = torch.cat([want, torch.zeros(3, 1, dtype=want.dtype)], 1)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


CONVS = {
    "plain": lambda: nn.Conv2d(4, 3, 3, padding=1),
    "strided-dilated": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
    "same-reflect": lambda: nn.Conv2d(4, 3, 3, padding="same", padding_mode="reflect", bias=False),
    "conv1d": lambda: nn.Conv1d(4, 3, 3, padding=1),
}


def _objective(layer, xs, ys, w0_params, lam_of_group):
    loss = sum(((layer(x) - y) ** 2).sum() for x, y in zip(xs, ys))
    groups = getattr(layer, "groups", 1)
    w = layer.weight.reshape(groups, layer.weight.shape[0] // groups, -1)
    w0 = w0_params[0].reshape(w.shape)
    reg = sum(lam_of_group[g] * ((w[g] - w0[g]) ** 2).sum() for g in range(groups))
    if layer.bias is not None:
        b = layer.bias.reshape(groups, -1)
        b0 = w0_params[1].reshape(groups, -1)
        reg = reg + sum(lam_of_group[g] * ((b[g] - b0[g]) ** 2).sum() for g in range(groups))
    return loss + reg


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_conv_solve_is_the_damped_least_squares_optimum(kind):
    torch.manual_seed(1)
    layer = CONVS[kind]().double()
    shape = (3, 4, 9) if kind == "conv1d" else (3, 4, 9, 8)
    xs = [torch.randn(*shape, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        ys = [layer(x) + 0.3 * torch.randn_like(layer(x)) for x in xs]
    gram = _gram(layer, xs, ys)
    w0 = augmented_weight(layer)
    original = [p.detach().clone() for p in (layer.weight, layer.bias) if p is not None]
    alpha = 0.05
    w = solve(gram, w0, alpha, has_bias=layer.bias is not None)
    lam = alpha * torch.diagonal(gram.H, dim1=1, dim2=2).mean(1)
    if layer.bias is None:  # the solve drops the constant row: its scale excludes it
        lam = alpha * torch.diagonal(gram.H[:, :-1, :-1], dim1=1, dim2=2).mean(1)
    set_augmented_weight(layer, w)
    loss = _objective(layer, xs, ys, original, lam)
    grads = torch.autograd.grad(loss, [p for p in layer.parameters()])
    scale = float(loss.detach())
    assert max(float(g.abs().max()) for g in grads) < 1e-8 * max(scale, 1.0)
    # and the Gram-based error is the direct squared error of the fitted layer
    with torch.no_grad():
        direct = sum(float(((layer(x) - y) ** 2).sum()) for x, y in zip(xs, ys))
    assert error(gram, augmented_weight(layer)) == pytest.approx(direct, rel=1e-9)


def test_gram_sum_equals_gram_of_all_batches():
    torch.manual_seed(2)
    layer = nn.Conv2d(2, 3, 3, padding=1).double()
    xs = [torch.randn(2, 2, 5, 5, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randn(2, 3, 5, 5, dtype=torch.float64) for _ in range(3)]
    whole = _gram(layer, [torch.cat(xs)], [torch.cat(ys)])
    parts = _gram(layer, xs[:1], ys[:1]) + _gram(layer, xs[1:], ys[1:])
    torch.testing.assert_close(parts.H, whole.H)
    torch.testing.assert_close(parts.C, whole.C)
    assert parts.yy == pytest.approx(whole.yy) and parts.rows == whole.rows


def test_large_damping_stays_at_the_original_weights():
    torch.manual_seed(3)
    layer = nn.Linear(4, 2).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    gram = _gram(layer, [x], [torch.randn(50, 2, dtype=torch.float64)])
    w0 = augmented_weight(layer)
    torch.testing.assert_close(solve(gram, w0, 1e9), w0, rtol=1e-6, atol=1e-6)


def _all_rows_then_pick(layer, x, y, pick):
    """The reference: every output position's patch (unfold), then the picked rows."""
    cols, out = layer_rows(layer, x, y)
    return cols[:, pick], out[:, pick]


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(6, 4, 3, padding=1),
    lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False),
    lambda: nn.Conv2d(6, 6, (3, 2), dilation=(2, 1), padding=(2, 1), groups=3),
    lambda: nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(6, 4, 1),
    lambda: nn.Conv2d(6, 4, 5, stride=(2, 1), padding="valid"),
    lambda: nn.Conv1d(6, 4, 3, padding=2, dilation=2, groups=2),
    lambda: nn.Linear(6, 4),
], ids=["3x3", "stride2-nobias", "dilated-grouped", "reflect", "1x1", "valid", "conv1d",
        "linear"])
def test_picked_rows_equal_the_rows_of_the_full_unfold(make):
    """Sampling before unfolding gathers exactly the rows (same order, same values) that
    indexing the full design matrix gives, so the sampled Gram is unchanged."""
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(3, 5, 6).double() if isinstance(layer, nn.Linear) else (
        torch.randn(3, 6, 11).double() if isinstance(layer, nn.Conv1d)
        else torch.randn(3, 6, 9, 8).double())
    y = layer(x).detach()
    total = layer_rows(layer, x, y)[0].shape[1]
    pick = torch.randperm(total)[:total // 2 + 1]
    cols, out = layer_rows(layer, x, y, pick)
    want_cols, want_out = _all_rows_then_pick(layer, x, y, pick)
    assert torch.equal(cols, want_cols) and torch.equal(out, want_out)


def test_sampled_gram_uses_the_rows_of_the_full_design():
    """``LayerGram.add(max_rows=...)`` equals the Gram of the seeded sample of all rows."""
    torch.manual_seed(1)
    layer = nn.Conv2d(4, 3, 3, padding=1).double()
    x = torch.randn(2, 4, 7, 7).double()
    y = layer(x).detach()
    g = LayerGram()
    g.add(layer, x, y, max_rows=20)
    cols, out = layer_rows(layer, x, y)
    pick = torch.randperm(cols.shape[1], generator=torch.Generator().manual_seed(98))[:20]
    cols = torch.cat([cols[:, pick], torch.ones(1, 20, 1, dtype=torch.float64)], dim=-1)
    assert g.rows == 20
    assert torch.allclose(g.H, cols.transpose(1, 2) @ cols, rtol=0, atol=1e-12)
    assert g.yy == pytest.approx(float(out[:, pick].pow(2).sum()))
