"""Issue 16, security: no pickled code runs unless the user asks for it.

A checkpoint whose unpickling would create a file is refused by ``load_checkpoint`` and
by the command line (``--checkpoint``, ``report SLIM.pt``) unless the user opts in with
``allow_pickle=True`` / ``--allow-pickle``; a slim model ships safely as safetensors
weights plus its plan, reloaded onto the user's own model definition.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import CheckpointError
from fxprune.models import create_model, load_checkpoint, read_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


class Planted:
    """Unpickling this object calls ``open(path, "w")``: it creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_checkpoint(tmp_path, state):
    """A training checkpoint that carries a :class:`Planted` object next to the weights;
    returns ``(checkpoint path, the file its unpickling would create)``."""
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "planted.pth"
    torch.save({"state_dict": state, "extra": Planted(marker)}, path)
    assert not marker.exists()
    return path, marker


def call_main(capsys, *args):
    """``fxprune.cli.main(ARGS)`` in this process: ``(status, stdout, stderr)``."""
    from fxprune.cli import main
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_load_checkpoint_refuses_pickled_code_by_default(tmp_path):
    model = create_model("tiny_mlp")
    path, marker = planted_checkpoint(tmp_path, model.state_dict())
    for load in (lambda: load_checkpoint(model, path), lambda: read_state_dict(path),
                 lambda: create_model("tiny_mlp", checkpoint=str(path))):
        with pytest.raises(CheckpointError) as err:
            load()
        assert not marker.exists(), "unpickling ran code from the checkpoint"
        message = str(err.value)
        assert "allow_pickle=True" in message and "--allow-pickle" in message
        assert "io.open" in message  # names what the file would construct
    # the opt-in: the user trusts the file, so it is unpickled (and its code runs)
    fresh = create_model("tiny_mlp")
    load_checkpoint(fresh, path, allow_pickle=True)
    assert marker.exists()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_plain_state_dicts_and_safetensors_need_no_opt_in(tmp_path):
    from safetensors.torch import save_file
    model = create_model("tiny_mlp")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "plain.pth")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    load_checkpoint(create_model("tiny_mlp"), tmp_path / "plain.pth")
    load_checkpoint(create_model("tiny_mlp"), tmp_path / "w.safetensors")


def test_cli_checkpoint_refuses_pickled_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, marker = planted_checkpoint(tmp_path, create_model("tiny_mlp").state_dict())
    for command in (["prune", "tiny_mlp", "--sparsity", "0.5", "--criterion", "l2",
                     "--no-measure-latency"], ["groups", "tiny_mlp", "-q"]):
        code, _, err = call_main(capsys, *command, "--checkpoint", path)
        assert code == 2 and not marker.exists(), err
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and "--allow-pickle" in lines[0], err
    code, _, err = call_main(capsys, "groups", "tiny_mlp", "--checkpoint", path,
                             "--allow-pickle", "-q")
    assert code == 0 and marker.exists(), err


def test_cli_report_does_not_unpickle_without_opt_in(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned.txt"
    torch.save(Planted(marker), tmp_path / "slim.pt")
    code, _, err = call_main(capsys, "report", "slim.pt")
    assert code == 2 and not marker.exists()
    assert "--allow-pickle" in err and "would run code" in err
    # with the sidecar of a real run, the recorded report is shown without loading
    from fxprune.cli.report import write_sidecar
    x = torch.randn(2, 16)
    res = fxprune.compile(create_model("tiny_mlp"), "l2", example_inputs=x, sparsity=0.5)
    write_sidecar(str(tmp_path / "slim.pt"), res.report, [1, 16], [1, 10], {})
    code, out, err = call_main(capsys, "report", "slim.pt")
    assert code == 0 and not marker.exists(), err
    assert "not recounted" in out and "--allow-pickle" in out
    assert f"{res.report.params_after:,}" in out


class Tied(nn.Module):
    """A conv net whose classifier shares its weight with a second head (tied tensors
    are stored once in the safetensors file)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6)
        self.head.weight = self.fc.weight

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.bn(self.c1(x))))).mean((2, 3))
        return self.fc(y) + self.head(y)


def build(seed=0):
    torch.manual_seed(seed)
    return Tied().double().eval()


def test_safetensors_slim_round_trip(tmp_path):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    res = fxprune.compile(build(), "l2", example_inputs=x, flops=0.5)
    with torch.no_grad():  # stands for fine-tuning: the slim weights differ from the dense
        for p in res.module.parameters():
            p.mul_(1.5)
    weights, plan = fxprune.save_slim(res, str(tmp_path / "slim.safetensors"))
    assert plan == str(tmp_path / "slim.plan.json")
    assert fxprune.Plan.from_json(plan).kept == res.plan.kept
    for source in (plan, None, res.plan):  # a plan path, the embedded plan, a Plan
        slim = fxprune.load_slim(build(seed=1), source, weights)
        assert torch.equal(slim(x), res.module(x))
        assert slim.head.weight is slim.fc.weight
    with pytest.raises(fxprune.PlanError, match="does not fit"):
        fxprune.load_slim(create_model("tiny_vgg"), plan, weights)
    other = fxprune.compile(build(), "l2", example_inputs=x, flops=0.8).plan
    with pytest.raises(CheckpointError, match="shape mismatch"):
        fxprune.load_slim(build(), other, weights)


def test_cli_prune_out_safetensors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = call_main(capsys, "prune", "tiny_vgg", "--criterion", "l2", "--sparsity",
                               "0.5", "--out", "slim.safetensors", "--no-measure-latency", "-q")
    assert code == 0, err
    assert (tmp_path / "slim.safetensors").is_file() and (tmp_path / "slim.plan.json").is_file()
    plan = json.loads((tmp_path / "slim.plan.json").read_text())
    assert plan["meta"]["model"] == "tiny_vgg" and "report" in plan["meta"]
    code, shown, err = call_main(capsys, "report", "slim.safetensors")
    assert code == 0 and "plan embedded" in shown, err
    assert f"{plan['meta']['report']['flops_after']:,}" in shown
    slim = fxprune.load_slim(create_model("tiny_vgg").eval(), "slim.plan.json",
                             "slim.safetensors")
    x = torch.randn(1, *plan["meta"]["input_shape"][1:])
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        slim(x)
    assert counter.get_total_flops() == plan["meta"]["report"]["flops_after"]
