"""obs on channel ⊗ kernel factored Grams (``gram="kron"``, :mod:`fxprune.passes.kron_gram`).

Oracles (float64): the factors equal the partial traces of the exact (bias-centred)
Gram of the same rows; the scalar greedy on ``(A⁻¹, Ŵ)`` gives the order and error
increases of the exact structured greedy on the damped ``A ⊗ B / t`` with one unit per
input channel, and the first step's errors equal a brute-force least-squares solve under
that matrix; the layer scores are the running maximum of those ÷ the output energy.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.criteria import obs as obs_mod
from fxprune.criteria import obs_consumers
from fxprune.errors import CriterionError
from fxprune.passes import lstsq
from fxprune.passes.kron_gram import KronGram, kron_problem, kron_supported
from fxprune.passes.obs_solve import consumer_columns, greedy_removal

F64 = torch.float64


def _conv(c=5, o=4, k=3, bias=False, seed=0, cls=nn.Conv2d):
    torch.manual_seed(seed)
    return cls(c, o, k, padding=1, bias=bias).double().requires_grad_(False)


def _exact_factors(conv, x, centred):
    """Partial traces of the exact Gram of the same rows (the definition)."""
    g = lstsq.LayerGram()
    g.add(conv, x, conv(x), cross=False)
    H = g.H[0]
    c, k = conv.weight.shape[1], conv.weight[0, 0].numel()
    Hx = H[:-1, :-1]
    if centred:
        Hx = Hx - torch.outer(H[:-1, -1], H[:-1, -1]) / H[-1, -1]
    H4 = Hx.reshape(c, k, c, k)
    return H4.diagonal(dim1=1, dim2=3).sum(-1), H4.diagonal(dim1=0, dim2=2).sum(-1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cls", [nn.Conv1d, nn.Conv2d])
def test_factors_are_partial_traces_of_the_exact_gram(bias, cls):
    conv = _conv(bias=bias, cls=cls)
    x = torch.randn((3, 5, 7) if cls is nn.Conv1d else (3, 5, 6, 7), dtype=F64)
    g = KronGram()
    with torch.no_grad():
        g.add(conv, x[:2], conv(x[:2]))
        g.add(conv, x[2:], conv(x[2:]))   # sums over calls
    A, B, t = g.factors(centred=bias)
    A_ref, B_ref = _exact_factors(conv, x, bias)
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(B, B_ref)
    assert t == pytest.approx(float(A_ref.trace()))
    assert g.yy == pytest.approx(float(conv(x).pow(2).sum()))


def _damped_kron(g, damp):
    A, B, t = g.factors(centred=False)
    eps = math.sqrt(1 + damp) - 1
    A = A + eps * A.diagonal().mean() * torch.eye(len(A), dtype=F64)
    B = B + eps * B.diagonal().mean() * torch.eye(len(B), dtype=F64)
    return torch.kron(A, B) / t


def _problem(bias, damp, seed=0):
    conv = _conv(c=6, o=3, bias=bias, seed=seed)
    x = torch.randn(4, 6, 5, 5, dtype=F64) + 0.5   # a non-zero mean, so that centring matters
    g = KronGram()
    g.add(conv, x, conv(x))
    A, B, t = g.factors(centred=bias)
    eps = math.sqrt(1 + damp) - 1
    A = A + eps * A.diagonal().mean() * torch.eye(len(A), dtype=F64)
    B = B + eps * B.diagonal().mean() * torch.eye(len(B), dtype=F64)
    return conv, g, torch.kron(A, B) / t, conv.weight.detach().reshape(3, -1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damp", [1e-2, 0.3])
def test_scalar_greedy_equals_structured_greedy_on_the_kronecker_gram(bias, damp):
    conv, g, Hk, W = _problem(bias, damp)
    inverse, W_hat = kron_problem(conv, g, damp)
    order, inc = greedy_removal(inverse, W_hat, [torch.tensor([i]) for i in range(6)])
    units = [consumer_columns(conv, [i]) for i in range(6)]
    order_ref, inc_ref = greedy_removal(torch.linalg.inv(Hk), W, units)
    assert order == order_ref
    torch.testing.assert_close(torch.tensor(inc, dtype=F64), torch.tensor(inc_ref, dtype=F64),
                               rtol=1e-8, atol=1e-12)


def test_first_step_errors_equal_brute_force_least_squares():
    """ΔE of deleting channel i alone = min over the kept weights of the squared error
    ``tr((W' − W) Hk (W' − W)ᵀ)`` under the factored model, solved directly."""
    conv, g, Hk, W = _problem(False, 1e-2)
    inverse, W_hat = kron_problem(conv, g, 1e-2)
    # one step removing all six: each unit's ΔE is its error alone, given nothing removed
    order, first = greedy_removal(inverse, W_hat, [torch.tensor([i]) for i in range(6)],
                                  per_step=6)
    for i, err in zip(order, first):
        cut = consumer_columns(conv, [i])
        keep = torch.tensor([j for j in range(Hk.shape[0]) if j not in set(cut.tolist())])
        best = W.clone()
        best[:, cut] = 0
        best[:, keep] = W[:, keep] + W[:, cut] @ torch.linalg.solve(
            Hk[keep][:, keep], Hk[keep][:, cut]).T
        ref = torch.trace((best - W) @ Hk @ (best - W).T)
        assert err == pytest.approx(float(ref), rel=1e-8)


def test_layer_scores_are_the_running_maximum_over_the_output_energy():
    conv, g, Hk, W = _problem(True, 1e-2)
    got = obs_mod.obs_layer_scores(conv, g, [torch.tensor([i]) for i in range(6)], damp=1e-2)
    order, inc = greedy_removal(torch.linalg.inv(Hk), W,
                                [consumer_columns(conv, [i]) for i in range(6)])
    ref, running = torch.zeros(6, dtype=F64), 0.0
    for u, v in zip(order, inc):
        running = max(running, v)
        ref[u] = running / g.yy
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-14)


def test_supported_layers():
    assert kron_supported(nn.Conv2d(4, 4, 3))
    assert kron_supported(nn.Conv1d(4, 4, 5))
    assert not kron_supported(nn.Conv2d(4, 4, 1))
    assert not kron_supported(nn.Conv2d(4, 4, 3, groups=2))
    assert not kron_supported(nn.Linear(4, 4))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.bn(self.a(x))))))


def test_compile_with_gram_kron_and_the_option_check():
    torch.manual_seed(0)
    net = _Net().eval()
    data = [(torch.randn(4, 3, 8, 8), None) for _ in range(2)]
    res = fxprune.compile(net, "obs", example_inputs=data[0][0][:1], data=data,
                          flops=0.6, gram="kron", repair=None)
    assert res.report.flops_ratio <= 0.6 + 1e-9
    exact = fxprune.compile(net, "obs", example_inputs=data[0][0][:1], data=data,
                            flops=0.6, gram="exact", repair=None)
    assert exact.report.flops_ratio <= 0.6 + 1e-9
    with pytest.raises(CriterionError, match="gram='kronecker'"):
        fxprune.compile(net, "obs", example_inputs=data[0][0][:1], data=data, flops=0.6,
                        gram="kronecker")


def test_auto_factors_only_wide_convs():
    net = _Net()
    consumers = {"b": obs_consumers._Consumer("b", net.b), "c": obs_consumers._Consumer("c", net.c)}
    assert obs_mod.factored_layers(consumers, "kron") == ["b"]
    assert obs_mod.factored_layers(consumers, "exact") == []
    assert obs_mod.factored_layers(consumers, "auto") == []   # 72 inputs: exact
    wide = nn.Conv2d(obs_mod.KRON_MIN_UNKNOWNS // 9 + 1, 4, 3)
    assert obs_mod.factored_layers({"w": obs_consumers._Consumer("w", wide)}, "auto") == ["w"]


def test_a_conv_too_wide_for_the_exact_gram_is_measured_factored():
    """1 821 channels x 9 = 16 389 inputs: more than MAX_UNKNOWNS exact (skipped, with the
    reason), 1 821 factored (measured)."""
    wide = obs_mod.MAX_UNKNOWNS // 9 + 1
    net = nn.Sequential(nn.Conv2d(2, wide, 1), nn.ReLU(), nn.Conv2d(wide, 2, 3)).eval()
    groups = fxprune.groups(net, torch.randn(1, 2, 5, 5))
    exact, skipped = obs_mod.find_consumers(net, groups, "exact")
    assert "2" not in exact and "more than" in skipped["2.weight"]
    factored, skipped = obs_mod.find_consumers(net, groups, "auto")
    assert "2" in factored and "2.weight" not in skipped
    assert obs_mod.factored_layers(factored, "auto") == ["2"]
