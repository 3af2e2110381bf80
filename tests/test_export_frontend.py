"""The torch.export front end (passes/frontend.py, aten_rules.py, aten_lowering.py):
the same groups as symbolic tracing on every fixture, verified rewrites on the ATen graph,
the automatic switch for shape-checking forwards, and fail-closed ATen ops."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fxprune
from fxprune.errors import FxpruneError, TraceError
from fxprune.models import create_model, list_models, model_input_size
from fxprune.passes.export_capture import export_dynamic
from fxprune.passes.frontend import capture, frontend_of

FIXTURES = [name for name in list_models() if name.startswith("tiny_")]


def _summary(groups):
    return [(g.id, g.size, g.prunable, g.kind, g.reason,
             sorted((m.target, m.dim, m.role, str(m.index_map)) for m in g.members))
            for g in groups]


def _fixture(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = create_model(name).to(dtype).eval()
    return model, torch.randn(2, *model_input_size(name), dtype=dtype)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_groups_equal_the_fx_front_end(name):
    """Every member (qualified parameter name, dim, role, index map) and every reason."""
    model, x = _fixture(name)
    fx = fxprune.groups(model, x, frontend="fx")
    exported = fxprune.groups(model, x, frontend="export")
    assert _summary(exported) == _summary(fx)


@pytest.mark.parametrize("name, criterion", [
    ("tiny_resnet", "l2"), ("tiny_vit", "l2"), ("tiny_se", "l2"), ("tiny_split", "l2"),
    ("tiny_resnet", "oba"), ("tiny_vit", "oba")])
def test_compile_on_the_export_front_end_is_exact_and_plans_as_fx(name, criterion):
    model, x = _fixture(name, torch.float64)
    data = [(torch.randn_like(x), torch.randint(0, 4, (x.shape[0],))) for _ in range(2)]
    kw = dict(flops=0.6, repair=None, progress=False, output_fn=_logits)
    if criterion != "l2":
        kw.update(data=data, loss_fn=_loss)
    fx = fxprune.compile(model, criterion, x, frontend="fx", **kw)
    ex = fxprune.compile(model, criterion, x, frontend="export", **kw)
    assert ex.report.frontend == "export" and fx.report.frontend == "fx"
    assert "front end: torch.export" in ex.report.table()
    assert ex.report.max_rel_error < 1e-6
    assert ex.plan.kept == fx.plan.kept
    assert ex.report.flops_after == fx.report.flops_after
    assert ex.report.params_after == fx.report.params_after
    x4 = torch.randn(4, *x.shape[1:], dtype=x.dtype)
    torch.testing.assert_close(_logits(ex.module(x4)), _logits(fx.module(x4)))


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _loss(out, target):
    out = _logits(out)
    return F.cross_entropy(out.reshape(out.shape[0], -1)[:, :4], target)


class ShapeChecked(torch.nn.Module):
    """A forward with a shape check (timm's Conv2dSame / ConvMlp style): symbolic tracing
    refuses it, torch.export sees the example's shape."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        if h.shape[-1] % 2 == 0:  # "same" padding computed from the input size
            h = F.pad(h, (1, 1, 1, 1))
        return self.fc(self.conv2(h).mean((2, 3)))


def test_auto_switches_to_export_on_a_shape_check_and_says_so():
    torch.manual_seed(0)
    model = ShapeChecked().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(TraceError, match="control flow"):
        fxprune.groups(model, x, frontend="fx")
    groups = {g.id: g for g in fxprune.groups(model, x)}
    assert set(groups) == {"conv1", "conv2", "fc"} and groups["conv1"].prunable
    assert {m.target for m in groups["conv1"].members} == {
        "conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean",
        "bn1.running_var", "conv2.weight"}
    result = fxprune.compile(model, "l2", x, flops=0.5)
    assert result.report.frontend == "export" and result.report.max_rel_error < 1e-6
    assert result.report.to_dict()["frontend"] == "export"
    slim = result.module
    assert slim.conv1.weight.shape[0] < 8  # pruned, named as in the model
    for batch in (1, 4):  # the dynamic batch survives the rewrite and a new export
        xb = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
        program = export_dynamic(slim, (x,)).program
        torch.testing.assert_close(program.module()(xb), slim(xb))


def test_the_users_model_is_untouched():
    model = ShapeChecked().train()
    model.bn1.running_mean.fill_(0.5)
    before = copy.deepcopy(model.state_dict())
    fxprune.compile(model, "l2", torch.randn(2, 3, 8, 8), flops=0.5, frontend="export")
    assert model.training and model.bn1.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_graph_records_its_front_end_and_names_parameters():
    model, x = _fixture("tiny_resnet")
    gm = capture(model, x, frontend="export")
    assert frontend_of(gm) == "export" and frontend_of(capture(model, x)) == "fx"
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert reads <= {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert torch.equal(gm(x), model(x))


def test_unknown_aten_ops_fail_closed_with_the_op_named():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.special.erfinv(torch.tanh(self.a(x))))
    groups = {g.id: g for g in fxprune.groups(Odd(), torch.randn(2, 4), frontend="export")}
    assert not groups["a"].prunable and "unknown op aten::special_erfinv" in groups["a"].reason


def test_bad_frontend_and_fx_only_options_are_refused():
    model, x = _fixture("tiny_mlp")
    with pytest.raises(FxpruneError, match="choose one of auto, fx, export"):
        fxprune.groups(model, x, frontend="dynamo")
    with pytest.raises(FxpruneError, match="options of the FX front end"):
        fxprune.groups(model, x, frontend="export", leaf_modules=[torch.nn.Linear])


def test_layer_passes_see_modules_on_the_export_graph(tmp_path):
    """Layers come back as torch modules (passes/layer_modules.py), so module-based passes
    work: OBS and least-squares repair re-fit them, unstructured masks their weights,
    apply_plan / load_slim replay a plan on a fresh model."""
    torch.manual_seed(0)
    model = ShapeChecked().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gm = capture(model, x)
    assert isinstance(gm.get_submodule("conv1"), torch.nn.Conv2d)
    assert isinstance(gm.get_submodule("bn1"), torch.nn.BatchNorm2d)
    assert gm.get_submodule("conv1").weight is not model.conv1.weight  # own copies
    data = [(torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (16,)))
            for _ in range(3)]
    obs = fxprune.compile(model, "obs", x, data=data, flops=0.6, repair="full", progress=False)
    assert obs.report.frontend == "export" and obs.report.repair is not None
    assert obs.report.max_rel_error < 1e-6
    dense = fxprune.compile(model, "l2", x, sparsity=0.5, unstructured=True)
    assert "416 of 832 Conv/Linear weights kept" in dense.report.notes[0]
    replay = fxprune.apply_plan(ShapeChecked().double().eval(), obs.plan, x, verify=True)
    assert replay.report.max_rel_error < 1e-6
    path = str(tmp_path / "slim.safetensors")
    fxprune.save_slim(obs, path)
    loaded = fxprune.load_slim(ShapeChecked().double().eval(), None, path, x)
    torch.testing.assert_close(loaded(x), obs.module(x))


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_vit", "tiny_se"])
def test_connectivity_equals_the_fx_front_end(name):
    model, x = _fixture(name)
    fx = fxprune.connectivity(model, x, frontend="fx")
    ex = fxprune.connectivity(model, x, frontend="export")
    assert ex.layers == fx.layers
    assert all(ex.kind(a, b) == fx.kind(a, b) for a in fx.layers for b in fx.layers)


class _ShapedLike(torch.nn.Module):
    """``reshape_as`` / ``view_as`` / ``expand_as`` (LeViT's attention reshapes its output
    like its input): aten's ``*_as`` ops carry channels as the method forms do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.gate = torch.nn.Parameter(torch.ones(1, 1, 16))

    def forward(self, x):
        h = torch.relu(self.a(x))
        flat = h.flatten(0, 1).reshape_as(h).view_as(h)
        return self.b(flat * self.gate.expand_as(flat))


def test_aten_as_ops_keep_channels_prunable():
    model, x = _ShapedLike().double().eval(), torch.randn(2, 3, 8, dtype=torch.float64)
    hidden = {g.id: g for g in fxprune.groups(model, x, frontend="export")}["a"]
    assert hidden.prunable, hidden.reason
    res = fxprune.compile(model, "l2", x, sparsity=0.5, frontend="export", progress=False)
    assert res.report.max_rel_error < 1e-10


class _BareAddmm(torch.nn.Module):
    """Two linear layers written as ``torch.addmm`` over bare parameters, the first weight
    transposed by ``how``: the captured graph holds ``t`` / ``transpose`` / ``permute``
    lowered to methods, or ATen's ``numpy_T`` / ``mT``."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(16))
        self.w2, self.b2 = torch.nn.Parameter(torch.randn(4, 16)), torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        w = self.w1
        wt = {"t": w.t, "T": lambda: w.T, "mT": lambda: w.mT,
              "transpose": lambda: w.transpose(0, 1), "permute": lambda: w.permute(1, 0)}[self.how]()
        return torch.addmm(self.b2, torch.relu(torch.addmm(self.b1, x, wt)), self.w2.t())


@pytest.mark.parametrize("frontend", ["export", "fx"])
@pytest.mark.parametrize("how", ["t", "T", "mT", "transpose", "permute"])
def test_addmm_over_any_spelling_of_a_transposed_weight_prunes_exactly(how, frontend):
    """The ``addmm`` rule (ATen's, and ``torch.addmm`` under symbolic tracing, which had
    none) reads the same transpose predicate as the weight rules (it missed the lowered
    methods, so no group was found), and ``numpy_T`` / ``mT`` are permutes instead of
    unknown ops."""
    torch.manual_seed(0)
    model, x = _BareAddmm(how).eval(), torch.randn(3, 8)
    groups = fxprune.groups(model, x, frontend=frontend)
    hidden = next(g for g in groups if g.id == "w1")
    assert hidden.prunable and hidden.size == 16, hidden.reason
    res = fxprune.compile(model, "l2", example_inputs=x, flops=0.6, frontend=frontend,
                          progress=False)
    assert res.module.w1.shape == (9, 8) and res.module.w2.shape == (4, 9)
    assert res.report.max_rel_error < 1e-5
