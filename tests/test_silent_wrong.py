"""Issue 16, "silently wrong": each input that used to give a wrong result without a word
now gets a clear error, or leaves the user's model bit-identical.

Tiny float64 nets, data-free "l2" where the criterion does not matter, "oba" where
calibration data is part of the path under test.
"""
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.criteria import Criterion, register_criterion

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """conv-BN-relu-conv-relu-pool-linear; ``width`` is c1's channel count."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        return self.fc(F.relu(self.c2(y)).mean((2, 3)))


class Twin(Net):
    """The same layers as :class:`Net` under another class name."""


class Deeper(Net):
    """:class:`Net` with one more conv: every group id of Net exists here too."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv2d(5, 5, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        return self.fc(F.relu(self.c3(F.relu(self.c2(y)))).mean((2, 3)))


class Counting(Net):
    """A forward that updates state in place: a call counter (run for real while tracing),
    a running sum that depends on the input (a graph node), and a plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(3, dtype=torch.float64))
        self.plain = torch.zeros(2, dtype=torch.float64)

    def forward(self, x):
        self.calls.add_(1)
        self.plain.add_(1)
        self.seen.add_(x.detach().mean((0, 2, 3)))
        return super().forward(x)


def make(cls=Net, *args, seed=0):
    torch.manual_seed(seed)
    return cls(*args).double().eval()


def batch(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (n,), generator=gen))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"the input model changed: {k}"


# ----------------------------------------------------------------------------- ignore
def test_ignore_string_is_one_name():
    model, x = make(), batch()[0]
    as_string = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5, ignore="c2")
    as_list = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5, ignore=["c2"])
    assert as_string.plan.kept == as_list.plan.kept
    assert "c2" not in as_string.plan.kept and "c1" in as_string.plan.kept
    assert as_string.module.c2.out_channels == 5


@pytest.mark.parametrize("ignore,close", [(["no_such_layer"], None), (["c3"], "c2"),
                                           ("layer4", None), (["c*", "bnn"], "bn")])
def test_ignore_name_matching_nothing_is_an_error(ignore, close):
    model, x = make(), batch()[0]
    with pytest.raises(fxprune.UnknownNameError, match="matches no module") as err:
        fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5, ignore=ignore)
    assert isinstance(err.value, fxprune.FxpruneError)
    if close:
        assert close in str(err.value).split("close matches:")[1]


def test_ignore_prefix_and_glob():
    model, x = make(), batch()[0]
    res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5, ignore=["c?"])
    assert res.plan.removed_count() == 0  # both convs kept whole, fc's output is never pruned
    deeper = make(Deeper)
    res = fxprune.compile(deeper, "l2", example_inputs=x, sparsity=0.5, ignore=["c[23]"])
    assert set(res.plan.kept) == {"c1"}


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("typo,value,valid", [("ignored", ["c2"], "'ignore'"),
                                              ("max_layer_sparsty", 0.1, "'max_layer_sparsity'"),
                                              ("seeed", 1, "max_layer_sparsity")])
def test_misspelt_compile_keyword_is_a_type_error(typo, value, valid):
    model, x = make(), batch()[0]
    for criterion in ("l2", "oba"):
        with pytest.raises(TypeError, match=typo) as err:
            fxprune.compile(model, criterion, example_inputs=x, data=[batch()], flops=0.5,
                            **{typo: value})
        assert valid in str(err.value) and isinstance(err.value, fxprune.FxpruneError)


def test_flop_names_flops():
    with pytest.raises(TypeError, match="did you mean 'flops'"):
        fxprune.compile(make(), "l2", example_inputs=batch()[0], flop=0.5)


def test_criterion_options_are_declared_and_checked():
    model, data = make(), [batch()]
    with pytest.raises(TypeError, match="'first_order'") as err:
        fxprune.saliency(model, "oba", data=data, firstorder=True)
    assert "options of criterion 'oba': first_order" in str(err.value)
    with pytest.raises(TypeError, match="seed"):  # seed belongs to "random", not "l2"
        fxprune.saliency(model, "l2", example_inputs=data[0][0], seed=1)
    fxprune.saliency(model, "oba", data=data, first_order=True)
    a = fxprune.compile(model, "random", example_inputs=data[0][0], sparsity=0.5, seed=1)
    b = fxprune.compile(model, "random", example_inputs=data[0][0], sparsity=0.5, seed=2)
    assert a.plan.kept != b.plan.kept  # the option reaches the criterion
    for name in ("l1", "l2", "random", "taylor", "obd", "oba", "oba-exact", "sosp-h", "sosp-i"):
        crit = fxprune.criteria.get_criterion(name)
        assert crit.options is not None, f"built-in criterion {name} declares no options"


def test_undeclared_user_criterion_keeps_its_options_but_not_typos():
    seen = {}

    def score(ctx):
        seen.update(ctx.options)
        return {n: p.detach().abs() for n, p in ctx.module.named_parameters()}

    register_criterion(Criterion("test-undeclared", "test", score, needs_data=False),
                       overwrite=True)
    model, x = make(), batch()[0]
    fxprune.compile(model, "test-undeclared", example_inputs=x, sparsity=0.5, alpha=3)
    assert seen == {"alpha": 3}
    with pytest.raises(TypeError, match="did you mean 'ignore'"):
        fxprune.compile(model, "test-undeclared", example_inputs=x, sparsity=0.5, ignored=["c2"])


# ----------------------------------------------------------------------------- plans
def test_plan_from_another_architecture_is_refused():
    x = batch()[0]
    plan = fxprune.compile(make(), "l2", example_inputs=x, flops=0.5).plan
    assert plan.meta["fingerprint"]["groups"] == {"c1": 6, "c2": 5, "fc": 4}
    plan = fxprune.Plan.from_json(plan.to_json())  # the fingerprint survives JSON
    with pytest.raises(fxprune.PlanError, match=r"c1 \(6 -> 8 channels\)"):
        fxprune.apply_plan(make(Net, 8), plan, x)
    with pytest.raises(fxprune.PlanError, match="c3") as err:
        fxprune.apply_plan(make(Deeper), plan, x)  # every planned group exists there
    assert "made on a different one" in str(err.value)
    with pytest.raises(fxprune.PlanError, match="made on a Net, this model is a Twin"):
        fxprune.apply_plan(make(Twin), plan, x)
    again = fxprune.apply_plan(make(Net, seed=1), plan, x[:1])  # same model, other batch
    assert again.module.c1.out_channels == len(plan.kept["c1"])


def test_plan_without_fingerprint_still_loads():
    x = batch()[0]
    data = json.loads(fxprune.compile(make(), "l2", example_inputs=x, flops=0.5).plan.to_json())
    del data["meta"]["fingerprint"]
    old = fxprune.Plan.from_json(json.dumps(data))
    assert fxprune.apply_plan(make(), old, x).module.c1.out_channels == len(old.kept["c1"])
    with pytest.raises(fxprune.PlanError, match="has 8 channels, the plan expects 6"):
        fxprune.apply_plan(make(Net, 8), old, x)


def test_duplicated_kept_indices_are_refused():
    with pytest.raises(fxprune.PlanError, match=r"\[1\] appear more than once"):
        fxprune.Plan({"c1": [0, 1, 1, 2]})
    text = json.dumps({"format": 1, "kept": {"c1": [0, 1, 1, 2]}, "sizes": {"c1": 6}})
    with pytest.raises(fxprune.PlanError, match="more than once"):
        fxprune.Plan.from_json(text)
    with pytest.raises(fxprune.PlanError, match="integer"):
        fxprune.Plan({"c1": [0, 1.5]})
    plan = fxprune.Plan({"c1": [0, 1, 2, 3]})
    plan.kept["c1"] = [0, 0, 1, 2]  # edited after construction
    with pytest.raises(fxprune.PlanError, match="repeat"):
        fxprune.apply_plan(make(), plan, batch()[0])


def test_kept_lists_written_after_construction_are_checked_and_converted():
    """``plan.kept`` is a plain dict: a NumPy array or tensor written into it (an argsort,
    say) crashed deep in the rewrite, strings and bools slipped through as indices."""
    x = batch()[0]
    res = fxprune.compile(make(), "l2", example_inputs=x, flops=0.5)
    for convert in (np.array, torch.tensor, lambda k: [float(c) for c in reversed(k)]):
        plan = fxprune.Plan(dict(res.plan.kept), res.plan.sizes, res.plan.meta)
        plan.kept["c1"] = convert(res.plan.kept["c1"])
        again = fxprune.apply_plan(make(), plan, x)
        assert again.plan.kept == res.plan.kept
        torch.testing.assert_close(again.module(x), res.module(x))
    for bad in (["0", "1"], [True, 2], "012"):
        plan = fxprune.Plan(dict(res.plan.kept), res.plan.sizes, res.plan.meta)
        plan.kept["c1"] = bad
        with pytest.raises(fxprune.PlanError, match="integer channel indices"):
            fxprune.apply_plan(make(), plan, x)
    with pytest.raises(fxprune.PlanError, match="takes a fxprune Plan"):
        fxprune.apply_plan(make(), res.plan.kept, x)


# ----------------------------------------------------------------------------- in-place state
def test_inplace_state_updates_leave_the_model_bit_identical():
    model, data = make(Counting), [batch(seed=0), batch(seed=1)]
    before, plain = snapshot(model), model.plain.clone()
    fxprune.groups(model, data[0][0])
    fxprune.connectivity(model, data[0][0])
    fxprune.saliency(model, "oba", data=data, progress=False)
    res = fxprune.compile(model, "oba", data=data, flops=0.6, progress=False)
    fxprune.compile(model, "l2", example_inputs=data[0][0], flops=0.6)
    fxprune.apply_plan(model, res.plan, data[0][0])
    fxprune.compile(model, "l1", example_inputs=data[0][0], unstructured=True, sparsity=0.5)
    assert_same(model, before)
    assert torch.equal(model.plain, plain)
    model(data[0][0])  # the model itself still updates its state
    assert model.calls.item() == 1 and model.plain.tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("criterion", ["l2", "random"])
def test_empty_example_batch_is_refused(criterion):
    model, x = make(), batch()[0][:0]
    with pytest.raises(fxprune.DataError, match=r"shape \[0, 3, 8, 8\]: an empty batch"):
        fxprune.compile(model, criterion, example_inputs=x, flops=0.5)
    with pytest.raises(fxprune.DataError, match="empty batch"):
        fxprune.saliency(model, criterion, example_inputs=x)
    with pytest.raises(fxprune.DataError, match="empty batch"):
        fxprune.apply_plan(model, fxprune.Plan({"c1": [0, 1, 2]}), x)


# ----------------------------------------------------------------------------- hooks
def test_user_hooks_are_neither_called_nor_copied(caplog):
    model, x = make(), batch()[0]
    calls = {"c1": 0, "c2": 0, "bn": 0, "root": 0}

    def forward_hook(name):
        def hook(module, args, out):
            calls[name] += 1
            return out * 2
        return hook

    def pre_hook(module, args):
        calls["c2"] += 1
        return (args[0] * 0.5,)

    handles = [model.c1.register_forward_hook(forward_hook("c1")),
               model.bn.register_forward_hook(forward_hook("bn"), with_kwargs=False),
               model.c2.register_forward_pre_hook(pre_hook),
               model.register_forward_hook(forward_hook("root"))]
    hooked = model(x)
    assert calls == {"c1": 1, "c2": 1, "bn": 1, "root": 1}
    calls.update({k: 0 for k in calls})
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        fxprune.groups(model, x)
        res = fxprune.compile(model, "oba", data=[batch()], flops=0.6, progress=False)
    assert calls == {"c1": 0, "c2": 0, "bn": 0, "root": 0}
    assert "hooks of <root>, c1, bn and 1 more are not traced" in caplog.text
    for name, mod in res.module.named_modules():
        assert not (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks), name
    assert torch.equal(model(x), hooked)  # the user's hooks are still there and still fire
    for h in handles:
        h.remove()
    bare = model(x)
    kept = fxprune.apply_plan(model, res.plan, x).module
    assert kept(x).shape == bare.shape


def test_cli_forwards_seed_to_the_random_criterion(tmp_path, capsys, monkeypatch):
    from fxprune.cli import main
    monkeypatch.chdir(tmp_path)
    kept = []
    for seed in ("1", "2"):
        code = main(["prune", "tiny_vgg", "--criterion", "random", "--sparsity", "0.5",
                     "--seed", seed, "--no-measure-latency", "-q", "--plan", f"p{seed}.json"])
        assert code == 0, capsys.readouterr().err
        kept.append(json.loads((tmp_path / f"p{seed}.json").read_text())["kept"])
    assert kept[0] != kept[1]
