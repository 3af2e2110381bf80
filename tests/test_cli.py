"""The ``fxprune`` command line, run in subprocesses (``python -m fxprune.cli``).

The expensive runs (a real prune of timm's resnet18 at 64x64) are module-scoped
fixtures shared by the tests that inspect their outputs.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

RESNET = "timm:resnet18"
SMALL = ["--input-size", "3,64,64", "--batch-size", "2", "--batches", "1"]


def run_cli(*args, cwd=None, timeout=300):
    """Run ``python -m fxprune.cli ARGS``; return the CompletedProcess (text)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "fxprune.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


class Result:
    """stdout / stderr / returncode of an in-process ``fxprune.cli.main`` call."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def call_main(capsys, *args):
    """``fxprune.cli.main(ARGS)`` in this process: cheap checks that fail before any
    model is built (the subprocess tests cover the real entry point)."""
    from fxprune.cli import main
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_one_line_error(proc, *needles):
    """Non-zero exit, one line on stderr, no traceback, and every needle in the line."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def checkpoints(workdir):
    """resnet18 weights as .pth and .safetensors (random init, seeded)."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    state = timm.create_model("resnet18").state_dict()
    torch.save(state, workdir / "r18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(workdir / "r18.safetensors"))
    return {"pth": workdir / "r18.pth", "safetensors": workdir / "r18.safetensors"}


@pytest.fixture(scope="module")
def pruned(workdir, checkpoints):
    """One full run: synthetic data, l2, every output file."""
    proc = run_cli("prune", RESNET, "--checkpoint", checkpoints["pth"], "--criterion", "l2",
                   "--flops", "0.5", *SMALL, "--out", "slim.pt", "--export", "slim.pt2",
                   "--plan", "plan.json", "--report", "report.png", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_prune_outputs_and_report_table(pruned, workdir):
    for name in ("slim.pt", "slim.pt.json", "slim.pt2", "plan.json", "report.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "report.png").read_bytes()[:4] == b"\x89PNG"
    out = pruned.stdout
    assert "FLOPs" in out and "params" in out and "latency ms" in out
    assert "layer1.0.conv1" in out and "slim model: input [1, 3, 64, 64] -> output [1, 1000]" in out
    for stage in ("analysing", "scoring", "pruning", "verifying"):
        assert stage in pruned.stderr
    side = json.loads((workdir / "slim.pt.json").read_text())
    assert side["input_shape"] == [1, 3, 64, 64] and side["output_shape"] == [1, 1000]
    ratio = side["report"]["flops_after"] / side["report"]["flops_before"]
    assert abs(ratio - 0.5) < 0.01
    assert not list(workdir.glob(".fxprune-*")), "temporary files left behind"


def test_slim_model_loads_with_torch_only(pruned, workdir):
    """A fresh interpreter that imports only torch loads and runs both saved forms."""
    code = textwrap.dedent("""
        import json, sys, torch
        from torch.utils.flop_counter import FlopCounterMode
        side = json.load(open("slim.pt.json"))
        m = torch.load("slim.pt", weights_only=False).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            y = m(torch.zeros(side["input_shape"]))
        assert list(y.shape) == side["output_shape"], y.shape
        assert counter.get_total_flops() == side["report"]["flops_after"]
        assert sum(p.numel() for p in m.parameters()) == side["report"]["params_after"]
        ep = torch.export.load("slim.pt2")
        assert list(ep.module()(torch.zeros(side["input_shape"])).shape) == side["output_shape"]
        batch4 = [4] + side["input_shape"][1:]  # the program's batch dimension is free
        assert list(ep.module()(torch.zeros(batch4)).shape) == [4] + side["output_shape"][1:]
        assert not [k for k in sys.modules if k.split(".")[0] in ("timm", "fxprune")]
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_report_command_on_plan_and_slim(pruned, workdir, capsys, monkeypatch):
    side = json.loads((workdir / "slim.pt.json").read_text())
    flops_line = next(ln for ln in pruned.stdout.splitlines() if ln.startswith("FLOPs"))
    on_plan = run_cli("report", "plan.json", cwd=workdir)
    assert on_plan.returncode == 0, on_plan.stderr
    assert flops_line in on_plan.stdout and "layer4.1.conv1" in on_plan.stdout
    on_slim = run_cli("report", "slim.pt", "--allow-pickle", cwd=workdir)  # a pickle: opt in
    assert on_slim.returncode == 0, on_slim.stderr
    assert flops_line in on_slim.stdout and "recounted" in on_slim.stdout
    assert "differ" not in on_slim.stdout
    assert f"{side['report']['flops_after']:,}" in on_slim.stdout
    monkeypatch.chdir(workdir)
    on_program = call_main(capsys, "report", "slim.pt2")  # torch.export program + sidecar
    assert on_program.returncode == 0, on_program.stderr
    assert flops_line in on_program.stdout and "differ" not in on_program.stdout


def test_prune_image_folder_safetensors_iterative(workdir, checkpoints):
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (workdir / "images" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            pixels = torch.randint(0, 255, (10, 10, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(workdir / "images" / cls / f"{i}.png")
    proc = run_cli("prune", RESNET, "--checkpoint", checkpoints["safetensors"], "--criterion",
                   "l2", "--params", "0.9,0.8", "--data", "images", *SMALL,
                   "--no-measure-latency", "--report", "report.html", "--plan", "plan2.json",
                   cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "ImageFolder images: 6 images in 2 classes" in proc.stderr
    assert "step 2/2" in proc.stderr
    page = (workdir / "report.html").read_text()
    assert "<svg" in page and "layer1.0.conv1" in page and "http" not in page.split("<svg")[0]
    plan = json.loads((workdir / "plan2.json").read_text())
    assert plan["meta"]["report"]["params_after"] <= 0.8 * plan["meta"]["report"]["params_before"]


def test_prune_default_criterion_on_synthetic_data(workdir):
    """The default criterion on the synthetic data is the data-free l2 (compile's
    criterion='auto'; obs needs real data), tiny input."""
    proc = run_cli("prune", RESNET, "--flops", "0.6", "--input-size", "3,32,32",
                   "--batch-size", "2", "--batches", "1", "--no-measure-latency",
                   "--plan", "oba.json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "data-free" in proc.stderr  # l2 only takes the input shape from the data
    assert json.loads((workdir / "oba.json").read_text())["meta"]["criterion"] == "l2"


def test_fashion_mnist_idx_files(tmp_path):
    """A hand-made idx.gz set in the Debian package's layout, on a tiny registered net."""
    n = 12
    images = torch.randint(0, 255, (n, 28, 28), dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.uint8) % 10
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">HBB3I", 0, 8, 3, n, 28, 28) + images.numpy().tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">HBB1I", 0, 8, 1, n) + labels.numpy().tobytes())
    from fxprune.cli.data import read_idx
    assert torch.equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), images)
    proc = run_cli("prune", "tiny_vgg", "--criterion", "oba", "--sparsity", "0.25",
                   "--data", f"fashion-mnist:{tmp_path}", "--batch-size", "4", "--batches", "2",
                   "--no-measure-latency", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Fashion-MNIST" in proc.stderr


def test_groups_command_graphs(tmp_path):
    proc = run_cli("groups", RESNET, "--input-size", "3,32,32", "--graph", "g.html", "--json",
                   "g.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "layer2.0.conv2" in proc.stdout and "series pairs" in proc.stdout
    page = (tmp_path / "g.html").read_text()
    assert "<svg" in page and "data-group='layer1.0.conv1'" in page
    assert "layer1.0.conv1.weight" in page and "within-layer" in proc.stdout
    assert "src=" not in page and "href=" not in page and "http" not in page  # self-contained
    assert {g["id"] for g in json.loads((tmp_path / "g.json").read_text())} >= {"conv1", "fc"}
    dot = run_cli("groups", "tiny_resnet", "--graph", "g.dot", cwd=tmp_path)
    assert dot.returncode == 0, dot.stderr
    text = (tmp_path / "g.dot").read_text()
    assert text.startswith("digraph") and '"stem.0" -> "layer1.conv1"' in text


def test_groups_svg_needs_no_graphviz(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "")  # no `dot` to be found
    result = call_main(capsys, "groups", "tiny_resnet", "--graph", "g.svg")
    assert result.returncode == 0, result.stderr
    assert "data-group='layer1.conv1'" in (tmp_path / "g.svg").read_text()


def test_timm_vit_built_for_the_input_size(tmp_path, capsys, monkeypatch):
    """A ViT's position embedding is sized by img_size: --input-size builds it to fit
    (and in_chans for a 1-channel input)."""
    monkeypatch.chdir(tmp_path)
    result = call_main(capsys, "groups", "timm:vit_tiny_patch16_224", "--input-size", "1,32,32",
                       "--json", "g.json")
    assert result.returncode == 0, result.stderr
    members = {m["target"]: m for g in json.loads((tmp_path / "g.json").read_text())
               for m in g["members"]}
    assert "patch_embed.proj.weight" in members and "pos_embed" in members


def test_criteria_command(capsys):
    proc = call_main(capsys, "criteria")
    assert proc.returncode == 0, proc.stderr
    assert "oba" in proc.stdout and "(default with --data)" in proc.stdout
    assert "(default without --data)" in proc.stdout


BAD_ARGS = {  # run in a subprocess: the real entry point
    "flops zero": (["prune", RESNET, "--flops", "0"], ["--flops", "(0, 1]"]),
    "criterion typo": (["prune", RESNET, "--flops", "0.5", "--criterion", "oab"],
                       ["'oab'", "oba", "l1", "l2"]),
    "missing checkpoint": (["prune", RESNET, "--flops", "0.5", "--checkpoint", "no.pth"],
                           ["no.pth", "does not exist"]),
    "unknown model": (["prune", "timm:resnet81", "--flops", "0.5"], ["resnet81", "resnet18"]),
}
BAD_ARGS_IN_PROCESS = {  # the same error path, called in-process (fast)
    "flops above one": (["prune", RESNET, "--flops", "1.5"], ["--flops"]),
    "two budgets": (["prune", RESNET, "--flops", "0.5", "--params", "0.5"], ["not allowed"]),
    "no budget": (["prune", RESNET], ["required"]),
    "increasing list": (["prune", RESNET, "--flops", "0.4,0.5"], ["decreasing"]),
    "sparsity one": (["prune", RESNET, "--sparsity", "1"], ["[0, 1)"]),
    "bad input size": (["groups", RESNET, "--input-size", "3,a,2"], ["3,224,224"]),
    "bad report name": (["prune", RESNET, "--flops", "0.5", "--report", "r.txt"], [".png"]),
    "unknown registered": (["groups", "tiny_resnt"], ["tiny_resnet"]),
    "missing report input": (["report", "nothing.pt"], ["no such file"]),
    "missing fashion-mnist": (["prune", "tiny_vgg", "--sparsity", "0.2", "--data",
                               "fashion-mnist:/nonexistent"], ["apt-get install"]),
    "bad graph name": (["groups", "x", "--graph", "g.txt"], [".dot"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGS), ids=list(BAD_ARGS))
def test_bad_arguments_one_line(case, tmp_path):
    argv, needles = BAD_ARGS[case]
    proc = run_cli(*argv, cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, *needles)


@pytest.mark.parametrize("case", list(BAD_ARGS_IN_PROCESS), ids=list(BAD_ARGS_IN_PROCESS))
def test_bad_arguments_in_process(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, needles = BAD_ARGS_IN_PROCESS[case]
    result = call_main(capsys, *argv)
    assert result.returncode == 2
    assert_one_line_error(result, *needles)


def test_bad_data_and_checkpoint(tmp_path, checkpoints):
    import timm
    (tmp_path / "empty").mkdir()
    empty = run_cli("prune", RESNET, "--flops", "0.5", "--data", "empty", cwd=tmp_path)
    assert_one_line_error(empty, "empty", "no images")
    torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "r34.pth")
    wrong = run_cli("prune", RESNET, "--checkpoint", "r34.pth", "--flops", "0.5", "--criterion",
                    "l2", *SMALL, cwd=tmp_path)
    assert wrong.returncode == 2
    assert_one_line_error(wrong, "r34.pth", "does not match", "unexpected")


def test_internal_error_and_debug(tmp_path, capsys, monkeypatch):
    (tmp_path / "net.py").write_text("def build():\n    raise RuntimeError('boom')\n")
    plain = run_cli("groups", "net.py:build", cwd=tmp_path)
    assert plain.returncode == 1
    assert_one_line_error(plain, "RuntimeError: boom", "--debug")
    monkeypatch.chdir(tmp_path)
    from fxprune.cli import main
    with pytest.raises(RuntimeError, match="boom"):  # --debug: the exception propagates
        main(["groups", "net.py:build", "--debug"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = call_main(capsys, "prune", "tiny_vgg", "--sparsity", "0.5", "--device", "cuda")
    assert result.returncode == 2
    assert_one_line_error(result, "no CUDA device")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prune_on_gpu_with_oba(tmp_path):
    proc = run_cli("prune", RESNET, "--flops", "0.5", "--device", "cuda", "--input-size",
                   "3,64,64", "--batch-size", "8", "--batches", "2", "--out", "slim.pt",
                   "--export", "slim.pt2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = run_cli("report", "slim.pt", "--allow-pickle", cwd=tmp_path)
    assert report.returncode == 0 and "differ" not in report.stdout, report.stderr
