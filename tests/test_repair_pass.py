"""The repair pass (passes/repair.py) through ``fxprune.compile``, in float64.

Oracles: re-estimated batch-norm statistics equal the moments of the slim model's BN
inputs computed directly (module and functional BN); a sequential re-fit of a 3-layer
chain equals doing it by hand; the input model stays bit-identical; a repaired model
saves, loads without fxprune and exports.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import DataError, FxpruneError
from fxprune.models.fixtures import randomize_norms
from fxprune.passes.repair import ALPHAS

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.b3(self.c3(x)))
        return self.head(x.mean((2, 3)))


class FunctionalBN(nn.Module):
    """BN as timm traces it: ``F.batch_norm`` on registered buffers, inference mode."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        for name, n in (("n1", 8), ("n2", 6)):
            self.register_buffer(f"{name}_mean", torch.zeros(n))
            self.register_buffer(f"{name}_var", torch.ones(n))
            setattr(self, f"{name}_w", nn.Parameter(torch.ones(n)))
            setattr(self, f"{name}_b", nn.Parameter(torch.zeros(n)))
        self.head = nn.Linear(6, 4)

    def _bn(self, x, name):
        return F.batch_norm(x, getattr(self, f"{name}_mean"), getattr(self, f"{name}_var"),
                            getattr(self, f"{name}_w"), getattr(self, f"{name}_b"), False, 0.1, 1e-5)

    def forward(self, x):
        x = F.relu(self._bn(self.c1(x), "n1"))
        x = F.relu(self._bn(self.c2(x), "n2"))
        return self.head(x.mean((2, 3)))


def _data(n_batches=4, n=6, shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (n,), generator=g)) for _ in range(n_batches)]


def _bn_inputs(module, data, bn_nodes):
    """Inputs of the named FX nodes on every batch, by running the slim graph."""
    seen = {name: [] for name in bn_nodes}
    interp = torch.fx.Interpreter(module)
    original = interp.run_node

    def run_node(node):
        if node.name in seen:
            seen[node.name].append(interp.env[node.args[0]].detach().clone())
        return original(node)

    interp.run_node = run_node
    with torch.no_grad():
        for x, _ in data:
            interp.run(x)
    return seen


def _moments(xs):
    x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], dim=1)
    return x.mean(1), x.var(1, unbiased=True)


def test_bn_reestimation_equals_moments_of_slim_bn_inputs():
    model = randomize_norms(ConvBN())
    data = _data()
    res = fxprune.compile(model, "l2", data=data, flops=0.6, repair="bn", progress=False)
    gm = res.module
    nodes = {n.name: n.target for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)}
    inputs = _bn_inputs(gm, data, list(nodes))
    re_estimated = {r.name for r in res.report.repair.layers if r.action == "bn re-estimated"}
    assert {"b2", "b3"} <= re_estimated  # their inputs lost channels at c2 / c3
    assert "b1" not in re_estimated      # c1 loses outputs only: kept channels unchanged
    for node, target in nodes.items():
        if target not in re_estimated:
            continue
        mean, var = _moments(inputs[node])
        bn = gm.get_submodule(target)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-9, atol=1e-9)
    assert not gm.training


def test_functional_bn_reestimation():
    model = FunctionalBN().double().eval()
    data = _data(seed=1)
    res = fxprune.compile(model, "l2", data=data, flops=0.6, repair="bn", progress=False)
    gm = res.module
    bn_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    inputs = _bn_inputs(gm, data, [n.name for n in bn_nodes])
    node = next(n for n in bn_nodes if n.args[1].target == "n2_mean")
    mean, var = _moments(inputs[node.name])
    torch.testing.assert_close(gm.get_buffer("n2_mean"), mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gm.get_buffer("n2_var"), var, rtol=1e-9, atol=1e-9)
    assert any(r.name == "n2_mean" and r.action == "bn re-estimated"
               for r in res.report.repair.layers)


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 5)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def test_sequential_refit_of_a_chain_equals_doing_it_by_hand():
    torch.manual_seed(0)
    model = Chain().double().eval()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(40, 6, generator=g, dtype=torch.float64), torch.zeros(40, dtype=torch.long))
            for _ in range(4)]
    unrepaired = fxprune.compile(model, "l2", data=data, sparsity=0.4, repair=None, progress=False)
    res = fxprune.compile(model, "l2", data=data, sparsity=0.4, repair="full", progress=False)
    assert res.plan.kept == unrepaired.plan.kept
    by_name = {r.name: r for r in res.report.repair.layers}
    assert by_name["l2"].action == "re-fit" and by_name["l3"].action == "re-fit"
    slim = unrepaired.module
    kept1 = res.plan.kept[next(k for k in res.plan.kept if "l1" in k)]
    kept2 = res.plan.kept[next(k for k in res.plan.kept if "l2" in k)]
    with torch.no_grad():
        h1 = [torch.tanh(slim.l1(x)) for x, _ in data]
        dense_h2 = [model.l2(torch.tanh(model.l1(x)))[:, kept2] for x, _ in data]
        _refit_by_hand(slim.l2, h1, dense_h2, by_name["l2"].alpha)
        h2 = [torch.tanh(slim.l2(h)) for h in h1]
        dense_out = [model(x) for x, _ in data]
        _refit_by_hand(slim.l3, h2, dense_out, by_name["l3"].alpha)
    for name in ("l2", "l3"):
        torch.testing.assert_close(getattr(res.module, name).weight, getattr(slim, name).weight)
        torch.testing.assert_close(getattr(res.module, name).bias, getattr(slim, name).bias)
    assert kept1  # l1 lost outputs only and is left alone
    torch.testing.assert_close(res.module.l1.weight, slim.l1.weight)


def _refit_by_hand(layer, xs, ys, alpha):
    """Ridge toward the current weights on all batches with the alpha the pass chose."""
    assert alpha in ALPHAS
    X = torch.cat(xs)
    X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    Y = torch.cat(ys)
    W0 = torch.cat([layer.weight, layer.bias[:, None]], 1)
    H = X.T @ X
    lam = alpha * torch.diagonal(H).mean()
    W = torch.linalg.solve(H + lam * torch.eye(len(H), dtype=H.dtype), (X.T @ Y + lam * W0.T)).T
    layer.weight.copy_(W[:, :-1])
    layer.bias.copy_(W[:, -1])


def test_full_repair_brings_the_output_back_and_model_is_untouched():
    model = randomize_norms(ConvBN())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _data(n_batches=6, n=8)
    res = fxprune.compile(model, "l2", data=data, flops=0.5, progress=False)  # auto -> full
    rep = res.report.repair
    assert rep.mode == "full" and rep.held_out == 1
    assert rep.after.rel_error < rep.before.rel_error
    assert "repair (full)" in str(res.report)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training


def test_repaired_model_saves_loads_without_fxprune_and_exports(tmp_path):
    model = randomize_norms(ConvBN())
    data = _data()
    res = fxprune.compile(model, "l2", data=data, flops=0.5, repair="full", progress=False)
    x = data[0][0]
    torch.save(res.module, tmp_path / "slim.pt")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
            "y = m(torch.load(sys.argv[2])); "
            "assert not any(k.startswith('fxprune') for k in sys.modules); print(float(y.sum()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "slim.pt"), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with torch.no_grad():
        assert float(out.stdout) == pytest.approx(float(res.module(x).sum()), rel=1e-9)
    exported = torch.export.export(res.module, (x,))
    torch.testing.assert_close(exported.module()(x), res.module(x))


def test_repair_needs_data_and_a_known_mode():
    model = ConvBN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert fxprune.compile(model, "l2", example_inputs=x, flops=0.5).report.repair is None
    with pytest.raises(DataError, match="needs calibration data"):
        fxprune.compile(model, "l2", example_inputs=x, flops=0.5, repair="full")
    with pytest.raises(FxpruneError, match="use 'full'"):
        fxprune.compile(model, "l2", data=_data(), flops=0.5, repair="ful")


def test_one_batch_falls_back_to_bn_with_a_note():
    model = randomize_norms(ConvBN())
    res = fxprune.compile(model, "l2", data=_data(n_batches=1), flops=0.5, progress=False)
    rep = res.report.repair
    assert rep.mode == "bn" and any("at least 2 calibration batches" in n for n in rep.notes)


def test_too_little_data_for_a_wide_layer_keeps_its_weights_and_says_how_much():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 40), nn.ReLU(), nn.Linear(40, 2)).double().eval()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
            for _ in range(4)]
    res = fxprune.compile(model, "l2", data=data, sparsity=0.25, progress=False)
    row = next(r for r in res.report.repair.layers if r.name == "2")
    assert row.action == "skipped" and "training samples" in row.reason
    assert any("training samples" in n for n in res.report.repair.notes)


def test_apply_plan_with_data_repairs_like_compile():
    model = randomize_norms(ConvBN())
    data = _data()
    res = fxprune.compile(model, "l2", data=data, flops=0.5, progress=False)
    again = fxprune.apply_plan(model, res.plan, data=data)
    assert again.report.repair.mode == "full"
    x = data[0][0]
    torch.testing.assert_close(again.module(x), res.module(x))
    plain = fxprune.apply_plan(model, res.plan, x)
    assert plain.report.repair is None


def test_repair_summary_survives_the_json_report():
    from fxprune.cli.report import report_from_dict
    res = fxprune.compile(randomize_norms(ConvBN()), "l2", data=_data(), flops=0.5,
                          progress=False)
    again = report_from_dict(res.report.to_dict())
    assert again.repair == res.report.repair
    assert "repair (full)" in again.table()


def test_vit_repair_refits_heads_mlp_and_stream():
    """Head counts the rewrite turns into literals must not free values the dense graph
    still reads (a KeyError once); every Linear that lost inputs is re-fitted."""
    torch.manual_seed(0)
    model = fxprune.models.create_model("tiny_vit").double().eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    res = fxprune.compile(model, "l2", data=data, flops=0.5, progress=False)
    rep = res.report.repair
    assert any(r.name.endswith("attn.proj") and r.action == "re-fit" for r in rep.layers)
    assert rep.after.rel_error < rep.before.rel_error


def test_a_slim_model_that_fails_is_blamed_on_the_rewrite_not_the_inputs(monkeypatch):
    import fxprune.pipeline as api
    real_rewrite = api.rewrite

    def broken(analysis, kept):
        gm = real_rewrite(analysis, kept)
        for node in gm.graph.nodes:  # make the slim graph fail: a head with wrong in-size
            if node.op == "call_module" and node.target == "head":
                gm.head = nn.Linear(gm.head.in_features + 1, gm.head.out_features).double()
        return gm

    monkeypatch.setattr(api, "rewrite", broken)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(FxpruneError, match="rewrite bug") as info:
        fxprune.compile(ConvBN().double().eval(), "l2", example_inputs=x, flops=0.5)
    assert "example_inputs match" not in str(info.value)
