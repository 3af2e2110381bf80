"""Hostile and odd inputs: each gets a clear FxpruneError or a documented behaviour,
and the input model is bit-identical afterwards (state_dict, dtype, training flags).

Criteria: "l2" (data-free), "oba" (data-driven, second order), "taylor" (first order).
"""
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune

DATA_CRITERIA = [c for c in ("oba", "taylor") if c in fxprune.list_criteria()]


# ----------------------------------------------------------------------------- models
class Net(nn.Module):
    """conv-BN-relu-conv-relu-pool-linear; ``out`` selects the output structure."""

    def __init__(self, out: str = "tensor"):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)
        self.out = out

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        y = F.relu(self.c2(y)).mean((2, 3))
        z = self.fc(y)
        if self.out == "dict":
            return {"logits": z, "features": y}
        if self.out == "tuple":
            return z, y
        return z


@dataclasses.dataclass
class Output:
    logits: torch.Tensor


class DataclassNet(Net):
    def forward(self, x):
        return Output(super().forward(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: not traceable
            return x
        return -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Net()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.net(x))


class TiedLinear(nn.Module):
    """``b.weight`` is ``a.weight`` (one Parameter under two names)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = F.relu(self.a(y))
        return self.fc(F.relu(self.b(y)))


class TransposedTie(nn.Module):
    """An encoder weight reused, transposed, as a decoder (autoencoder-style)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 7)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.enc(x))
        return self.fc(F.linear(h, self.enc.weight.t()))


class SharedByTwoNames(nn.Module):
    """One Linear registered under two attribute names and called twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.first = nn.Linear(6, 6)
        self.second = self.first
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = F.relu(self.first(y))
        return self.fc(F.relu(self.second(y)))


class ChannelBuffer(nn.Module):
    """A registered [C, 1, 1] buffer added to the features (used as is), and a [C]
    buffer viewed eagerly (torch.fx folds the view into a constant)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.register_buffer("offset", torch.randn(6, 1, 1))
        self.register_buffer("scale", torch.rand(6) + 0.5)
        self.c2 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.c1(x) + self.offset) * self.scale.view(1, -1, 1, 1)
        return self.fc(self.c2(y).mean((2, 3)))


# ----------------------------------------------------------------------------- helpers
def make(model=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = (model or Net()).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def batch(n=4, dtype=torch.float64, seed=0, classes=4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 5, 5, generator=gen, dtype=dtype),
            torch.randint(0, classes, (n,), generator=gen))


def bit_equal(a, b):
    """Bitwise equality (NaN == NaN with the same payload)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.contiguous().view(as_int), b.contiguous().view(as_int)
    return torch.equal(a, b)


class Unchanged:
    """Context manager: the model is bit-identical on exit (also after an error)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        m = self.model
        self.state = {k: v.clone() for k, v in m.state_dict().items()}
        self.flags = {n: s.training for n, s in m.named_modules()}
        self.grads = {n: p.requires_grad for n, p in m.named_parameters()}
        self.ids = {n: id(p) for n, p in m.named_parameters(remove_duplicate=False)}
        return m

    def __exit__(self, *exc):
        m = self.model
        now = m.state_dict()
        assert now.keys() == self.state.keys()
        for k, v in now.items():
            assert bit_equal(v, self.state[k]), k
        assert {n: s.training for n, s in m.named_modules()} == self.flags
        assert {n: p.requires_grad for n, p in m.named_parameters()} == self.grads
        assert {n: id(p) for n, p in m.named_parameters(remove_duplicate=False)} == self.ids
        assert all(p.grad is None for p in m.parameters())
        return False


def kwargs_for(criterion, data):
    return {"data": data} if criterion != "l2" else {"example_inputs": data[0][0]}


# ----------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("criterion", DATA_CRITERIA)
@pytest.mark.parametrize("api", ["compile", "saliency"])
def test_nan_loss_names_the_batch(criterion, api):
    model = make()
    bad = batch(seed=1)
    bad[0][2, 1, 0, 0] = float("nan")
    data = [batch(seed=0), bad, batch(seed=2)]
    with Unchanged(model), pytest.raises(fxprune.DataError, match=r"batch 1\b") as err:
        if api == "compile":
            fxprune.compile(model, criterion, data=data, flops=0.5, progress=False)
        else:
            fxprune.saliency(model, criterion, data=data, progress=False)
    assert "not finite" in str(err.value)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_inf_loss_names_the_batch(criterion):
    model = make()

    def loss_fn(out, target):  # finite on batch 0, +inf on batch 1 (targets == 9)
        loss = F.cross_entropy(out, target.clamp(max=3))
        return loss + math.inf if bool((target == 9).any()) else loss

    data = [batch(seed=0), (batch(seed=1)[0], torch.full((4,), 9))]
    with Unchanged(model), pytest.raises(fxprune.DataError, match=r"batch 1\b"):
        fxprune.compile(model, criterion, data=data, flops=0.5, loss_fn=loss_fn, progress=False)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_nan_gradients_with_finite_loss_name_the_batch(criterion):
    """sqrt at 0 inside the loss: the loss is finite, its gradient is 0 * inf = NaN.
    Before the fix the NaN scores were silently ranked."""
    model = make()

    def loss_fn(out, target):
        loss = F.cross_entropy(out, target % 4)
        if bool((target >= 4).any()):  # batch 2 only
            loss = loss + torch.sqrt(out.sum() * 0.0)
        return loss

    x, _ = batch(seed=3)
    data = [batch(seed=0), batch(seed=1), (x, torch.full((4,), 5))]
    for api in ("compile", "saliency"):
        with Unchanged(model), pytest.raises(fxprune.DataError, match=r"batch 2\b") as err:
            if api == "compile":
                fxprune.compile(model, criterion, data=data, flops=0.5, loss_fn=loss_fn,
                                progress=False)
            else:
                fxprune.saliency(model, criterion, data=data, loss_fn=loss_fn, progress=False)
        assert "gradients" in str(err.value)


def test_nan_weights_data_free_criterion():
    model = make()
    with torch.no_grad():
        model.c2.weight[1, 2, 0, 0] = float("nan")
    with Unchanged(model), pytest.raises(fxprune.FxpruneError, match="c2.weight"):
        fxprune.compile(model, "l2", example_inputs=batch()[0], flops=0.5)


def test_nan_output_fails_verification_instead_of_passing():
    """max() silently dropped NaN, so a NaN output used to 'verify' with error 0."""
    model = make()
    x = batch()[0]
    x[0, 0, 0, 0] = float("nan")
    plan = fxprune.Plan({"c1": [0, 1, 2], "c2": [0, 4]})
    with Unchanged(model), pytest.raises(fxprune.FxpruneError, match="not finite"):
        fxprune.apply_plan(model, plan, x)
    fxprune.apply_plan(model, plan, x, verify=False)  # documented escape hatch


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("criterion", DATA_CRITERIA + ["l2"])
@pytest.mark.parametrize("empty", ["list", "generator", "dataloader"])
def test_empty_data(criterion, empty):
    model = make()
    if empty == "list":
        data = []
    elif empty == "generator":
        data = (b for b in [])
    else:
        ds = torch.utils.data.TensorDataset(torch.zeros(0, 3, 5, 5), torch.zeros(0).long())
        data = torch.utils.data.DataLoader(ds, batch_size=4)
    with Unchanged(model), pytest.raises(fxprune.DataError, match="empty"):
        fxprune.compile(model, criterion, data=data, example_inputs=batch()[0], flops=0.5)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_missing_data_and_bad_batches(criterion):
    model = make()
    with Unchanged(model):
        with pytest.raises(fxprune.DataError, match="needs calibration data"):
            fxprune.compile(model, criterion, example_inputs=batch()[0], flops=0.5)
        with pytest.raises(fxprune.DataError, match="at least one calibration batch"):
            fxprune.compile(model, criterion, data=[batch()], batches=0, flops=0.5)
        with pytest.raises(fxprune.DataError, match=r"batch 1 is a Tensor"):
            fxprune.compile(model, criterion, data=[batch(), batch()[0]], flops=0.5)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_batches_of_different_sizes(criterion):
    """Scores are per-batch means averaged over batches: batches may differ in size,
    and the result is the mean of the single-batch results."""
    model = make()
    data = [batch(4, seed=0), batch(1, seed=1), batch(3, seed=2)]
    with Unchanged(model):
        whole = fxprune.saliency(model, criterion, data=data, progress=False)
        parts = [fxprune.saliency(model, criterion, data=[b], progress=False) for b in data]
        for name, s in whole.parameters.items():
            mean = sum(p.parameters[name] for p in parts) / len(parts)
            torch.testing.assert_close(s, mean, rtol=1e-9, atol=1e-12)
        res = fxprune.compile(model, criterion, data=data, flops=0.6, progress=False)
    assert res.report.max_rel_error <= 1e-6
    assert res.plan.meta["input_shapes"] == [[4, 3, 5, 5]]  # the first batch's inputs


# ----------------------------------------------------------------------------- modes / dtypes
@pytest.mark.parametrize("criterion", DATA_CRITERIA + ["l2"])
def test_train_mode_model_is_scored_in_eval_and_left_in_train(criterion):
    model = make().train()
    model.bn.eval()  # a mixed-mode model: every flag must survive
    data = [batch(seed=0), batch(seed=1)]
    reference = make().eval()
    with Unchanged(model):
        sal = fxprune.saliency(model, criterion, data=data if criterion != "l2" else None,
                               example_inputs=data[0][0], progress=False)
        res = fxprune.compile(model, criterion, flops=0.5, progress=False,
                              **kwargs_for(criterion, data))
    expected = fxprune.saliency(reference, criterion, data=data if criterion != "l2" else None,
                                example_inputs=data[0][0], progress=False)
    for gid, s in expected.groups.items():
        torch.testing.assert_close(sal.groups[gid], s)
    assert model.training and not model.bn.training and model.c1.training
    assert not res.module.training  # the slim module comes back in eval mode
    assert res.report.max_rel_error <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("criterion", DATA_CRITERIA[:1] + ["l2"])
def test_low_precision_models(dtype, criterion):
    """Scored in float32 (a float32 copy of the low-precision weights), slim model
    returned in the model's dtype. Calibration data may stay float32: the example
    inputs taken from it are cast to the model's dtype."""
    model = make(dtype=dtype)
    data = [batch(dtype=torch.float32, seed=0), batch(dtype=torch.float32, seed=1)]
    with Unchanged(model):
        if criterion == "l2":
            res = fxprune.compile(model, criterion, example_inputs=data[0][0].to(dtype),
                                  flops=0.6)
        else:
            res = fxprune.compile(model, criterion, data=data, flops=0.6, progress=False)
        sal = fxprune.saliency(model, criterion, data=data if criterion != "l2" else None,
                               example_inputs=data[0][0].to(dtype), progress=False)
    assert {p.dtype for p in res.module.parameters()} == {dtype}
    assert {b.dtype for b in res.module.buffers() if b.is_floating_point()} == {dtype}
    assert res.report.max_rel_error is not None and res.report.max_rel_error <= 5e-2
    assert res.module(data[0][0].to(dtype)).dtype == dtype
    as32 = fxprune.saliency(model.float(), criterion, data=data if criterion != "l2" else None,
                            example_inputs=data[0][0], progress=False)
    for gid, s in as32.groups.items():
        assert sal.groups[gid].dtype == torch.float32
        torch.testing.assert_close(sal.groups[gid], s, rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        assert sal.parameters[name].dtype == dtype and sal.parameters[name].shape == p.shape


def test_low_precision_model_with_float32_example_inputs_is_a_trace_error():
    model = make(dtype=torch.float16)
    with Unchanged(model), pytest.raises(fxprune.TraceError, match="example_inputs"):
        fxprune.compile(model, "l2", example_inputs=batch(dtype=torch.float32)[0], flops=0.5)


# ----------------------------------------------------------------------------- ties / buffers
def test_tied_parameters_are_pruned_consistently():
    """One Parameter under two names shares one set of channel ids: its uses couple
    (a's input, a's output and b's output are one group), it is sliced once and stays
    tied in the slim model, and the oracle holds."""
    model = make(TiedLinear())
    x = torch.randn(4, 5, dtype=torch.float64)
    with Unchanged(model):
        res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5)
        assert res.report.max_rel_error <= 1e-6
        assert res.plan.removed_count() == 3
        slim = res.module
        assert slim.a.weight is slim.b.weight and slim.a.weight.shape == (3, 3)
        assert slim.stem.out_features == 3 and slim.fc.in_features == 3
        replay = fxprune.apply_plan(model, res.plan, x)
        torch.testing.assert_close(replay.module(x), slim(x))
        # unstructured: one mask per tensor, listed under both names
        un = fxprune.compile(model, "l2", example_inputs=x, unstructured=True, sparsity=0.5)
    assert torch.equal(un.masks["a.weight"], un.masks["b.weight"])
    assert un.module.a.weight is un.module.b.weight
    assert float((un.module.a.weight == 0).double().mean()) == 0.5


def test_tied_parameters_groups_are_consistent():
    model = make(TiedLinear())
    groups = fxprune.groups(model, torch.randn(4, 5, dtype=torch.float64))
    for g in groups:
        dims = {(m.target, m.dim) for m in g.members}
        for target, dim in dims:
            twin = {"a.weight": "b.weight", "b.weight": "a.weight"}.get(target)
            assert twin is None or (twin, dim) in dims or not g.prunable


def test_weight_reused_transposed_is_pruned_consistently():
    """Before the fix the masked reference only cut 'consumer' slices, missing the
    transposed reuse of a 'producer' weight: verification failed on a correct model."""
    model = make(TransposedTie())
    x = torch.randn(4, 5, dtype=torch.float64)
    with Unchanged(model):
        res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5)
    assert res.report.max_rel_error <= 1e-6
    assert res.module.enc.weight.shape == (4, 5)
    kept = res.plan.kept["enc"]
    with torch.no_grad():
        h = F.relu(model.enc(x))[:, kept]
        expected = model.fc(F.linear(h, model.enc.weight[kept].t()))
    torch.testing.assert_close(res.module(x), expected)


def test_module_under_two_names_stays_shared():
    model = make(SharedByTwoNames())
    x = torch.randn(4, 5, dtype=torch.float64)
    with Unchanged(model):
        res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5)
    assert res.report.max_rel_error <= 1e-6
    assert res.plan.removed_count() > 0
    # the graph calls the one module twice (torch.fx names it by its first path)
    calls = [n.target for n in res.module.graph.nodes if n.op == "call_module"]
    assert calls.count("first") == 2 and "second" not in calls
    assert res.module.first.weight.shape[0] == res.module.first.weight.shape[1]


def test_buffers_that_depend_on_channels_are_sliced():
    model = make(ChannelBuffer())
    x = batch()[0]
    with Unchanged(model):
        res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5)
    kept = res.plan.kept["c1"]
    assert len(kept) == 3
    slim_buffers = dict(res.module.named_buffers())
    # used as is: the buffer keeps its name and loses the removed channels
    torch.testing.assert_close(slim_buffers["offset"], model.offset[kept])
    # viewed eagerly in forward: torch.fx folds the view into a constant, sliced as well
    folded = [b for n, b in slim_buffers.items() if n.startswith("_tensor_constant")]
    assert len(folded) == 1
    torch.testing.assert_close(folded[0].flatten(), model.scale[kept])
    assert res.report.max_rel_error <= 1e-6


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("out", ["dict", "tuple"])
@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_structured_outputs_need_output_fn(out, criterion):
    model = make(Net(out))
    data = [batch(seed=0), batch(seed=1)]
    with Unchanged(model):
        with pytest.raises(fxprune.DataError, match="output_fn") as err:
            fxprune.compile(model, criterion, data=data, flops=0.6, progress=False)
        assert (("logits" in str(err.value)) if out == "dict" else ("tuple" in str(err.value)))
        pick = (lambda o: o["logits"]) if out == "dict" else (lambda o: o[0])
        res = fxprune.compile(model, criterion, data=data, flops=0.6, output_fn=pick,
                              progress=False)
        # the extra output (features of c2) reaches the model output: never pruned
        assert "c2" not in res.plan.kept
        # data-free criteria need no loss
        fxprune.compile(model, "l2", example_inputs=data[0][0], flops=0.8)
    assert res.report.max_rel_error <= 1e-6
    assert isinstance(res.module(data[0][0]), dict if out == "dict" else tuple)


def test_dataclass_output():
    """A dataclass built in forward is an op without a channel rule: the classifier
    feeding it stays whole (it is never pruned anyway); output_fn picks the logits."""
    model = make(DataclassNet())
    data = [batch(seed=0)]
    with Unchanged(model):
        with pytest.raises(fxprune.DataError, match="a Output"):
            fxprune.compile(model, "oba", data=data, flops=0.6, progress=False)
        res = fxprune.compile(model, "oba", data=data, flops=0.6, progress=False,
                              output_fn=lambda o: o.logits)
    rows = {r.id: r for r in res.report.groups}
    assert not rows["fc"].prunable and "Output" in rows["fc"].reason
    assert isinstance(res.module(data[0][0]), Output)


# ----------------------------------------------------------------------------- tracing
def test_control_flow_on_tensor_values_names_the_module_and_the_fix(caplog):
    """Tracing fails inside ``gate``: it is retried as a leaf (tests/test_leaf_retry.py),
    and the warning names the module and the fix."""
    model = make(Gated())
    x = batch()[0]
    with Unchanged(model):
        with caplog.at_level("WARNING", logger="fxprune.passes.trace"):
            res = fxprune.compile(model, "l2", example_inputs=x, flops=0.6)
        assert "could not trace `gate` (Gate" in caplog.text  # the innermost module, not <root>
        assert "concrete_args" in caplog.text and "torch.where" in caplog.text
        assert any("`gate` (Gate) is kept whole" in n for n in res.report.notes)
        for api in (fxprune.groups, fxprune.connectivity):
            api(model, x)
        explicit = fxprune.compile(model, "l2", example_inputs=x, flops=0.6, leaf_modules=[Gate])
    assert res.report.max_rel_error <= 1e-6 and explicit.report.max_rel_error <= 1e-6
    assert res.plan.kept == explicit.plan.kept


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_unreachable_budget_reports_the_best_reachable_ratio(kind):
    model = make()
    x = batch()[0]
    with Unchanged(model):
        with pytest.raises(fxprune.BudgetError, match="best reachable ratio") as err:
            fxprune.compile(model, "l2", example_inputs=x, **{kind: 0.01})
        best = float(re.search(r"best reachable ratio is ([0-9.]+)", str(err.value)).group(1))
        assert 0.01 < best < 1
        res = fxprune.compile(model, "l2", example_inputs=x, **{kind: best + 0.002})
    ratio = res.report.flops_ratio if kind == "flops" else res.report.params_ratio
    assert ratio <= best + 0.002
    assert abs(ratio - best) < 0.01


@pytest.mark.parametrize("budget", [
    {"flops": 0.0}, {"flops": 1.5}, {"flops": float("nan")}, {"params": -1},
    {"flops": 0.5, "params": 0.5}, {}, {"sparsity": 1.0}, {"flops": [0.5, 0.6]},
    {"flops": True}, {"max_layer_sparsity": 1.0, "flops": 0.5},
])
def test_malformed_budgets(budget):
    model = make()
    with Unchanged(model), pytest.raises(fxprune.BudgetError):
        fxprune.compile(model, "l2", example_inputs=batch()[0], **budget)


# ----------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_interrupt_during_scoring_leaves_the_model_intact(criterion):
    model = make().train()
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return F.cross_entropy(out, target)

    with Unchanged(model), pytest.raises(KeyboardInterrupt):
        fxprune.compile(model, criterion, data=[batch(seed=0), batch(seed=1)], flops=0.5,
                        loss_fn=loss_fn, progress=False)


def test_between_steps_errors_and_edits_do_not_reach_the_model():
    model = make()
    x = batch()[0]

    def fine_tune(module, step):  # edits the slim module in place, then fails
        with torch.no_grad():  # (not zero_: step 1 would refuse all-zero l2 scores first)
            for p in module.parameters():
                p.mul_(0.5)
        if step == 1:
            raise RuntimeError("fine-tuning crashed")

    with Unchanged(model):
        with pytest.raises(RuntimeError, match="fine-tuning crashed"):
            fxprune.compile(model, "l2", example_inputs=x, flops=[0.8, 0.6],
                            between_steps=fine_tune)
