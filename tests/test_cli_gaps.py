"""Issue 16, CLI gaps and misleading messages: ``--version``; ``--help`` / ``--version``
without torch; ``--ignore`` and ``--max-layer-sparsity`` reach ``compile``; output
errors name the user's path and an unwritable ``--out`` is refused before any work;
a missing plan file is a ``PlanError``; scoring logs progress off a terminal."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from fxprune.errors import PlanError

PROBE = """
import sys
from fxprune.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
sys.stderr.write("TORCH=%s\\n" % ("torch" in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["prune", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True,
                          text=True, timeout=120)
    assert "TORCH=False" in proc.stderr, proc.stderr
    if argv == ["--version"]:
        from importlib.metadata import version
        assert proc.stdout.strip() == f"fxprune {version('fxprune')}"


def test_lazy_package_keeps_the_public_names():
    import fxprune
    for name in fxprune.__all__:
        assert getattr(fxprune, name) is not None
    assert set(fxprune.__all__) <= set(dir(fxprune))
    assert fxprune.passes.__name__ == "fxprune.passes"
    with pytest.raises(AttributeError):
        fxprune.no_such_name


def _prune(capsys, tmp_path, *extra):
    """``fxprune prune tiny_vgg --criterion l2 --sparsity 0.5 ... --plan p.json``: the
    plan's kept counts and the group sizes."""
    from fxprune.cli import main
    code = main(["prune", "tiny_vgg", "--criterion", "l2", "--sparsity", "0.5",
                 "--no-measure-latency", "--no-verify", "-q", "--plan", str(tmp_path / "p.json"), *extra])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "p.json").read_text())
    return {g: len(k) for g, k in plan["kept"].items()}, plan["sizes"]


def test_ignore_and_max_layer_sparsity_reach_compile(tmp_path, capsys):
    kept, sizes = _prune(capsys, tmp_path)
    assert kept["features.1.0"] == sizes["features.1.0"] // 2  # pruned without --ignore
    kept, _ = _prune(capsys, tmp_path, "--ignore", "features.1.0,features.3")
    assert "features.1.0" not in kept and "features.3.0" not in kept  # kept whole
    assert kept["features.5.0"] < sizes["features.5.0"]
    kept, sizes = _prune(capsys, tmp_path, "--max-layer-sparsity", "0.25")
    assert all(kept[g] == sizes[g] - sizes[g] // 4 for g in kept)  # capped at 25 %


def test_round_to_reaches_compile(tmp_path, capsys):
    kept, sizes = _prune(capsys, tmp_path, "--round-to", "8")  # sparsity 0.5 halves groups
    pruned = [g for g in kept if kept[g] < sizes[g]]
    assert pruned and all(kept[g] % 8 == 0 for g in pruned)
    assert all(kept[g] == 8 for g in kept if sizes[g] == 8)  # 8 -> 4 would not be a multiple


def test_threads_sets_torchs_thread_count(capsys, monkeypatch):
    import torch
    from fxprune.cli import main
    before = torch.get_num_threads()
    try:
        assert main(["criteria", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as exit_:
        main(["criteria", "--threads", "0"])
    assert exit_.value.code == 2 and "--threads" in capsys.readouterr().err


def test_ignore_of_an_unknown_module_is_refused(tmp_path, capsys):
    from fxprune.cli import main
    code = main(["prune", "tiny_vgg", "--criterion", "l2", "--sparsity", "0.5",
                 "--ignore", "no_such_layer", "--no-measure-latency", "-q"])
    assert code == 2 and "no_such_layer" in capsys.readouterr().err


def _unwritable_dir(tmp_path):
    """A directory this process cannot create files in (root ignores modes: /proc)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        if not os.path.isdir("/proc"):
            pytest.skip("no unwritable directory available")
        return "/proc"
    return str(locked)


def test_unwritable_out_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    from fxprune.cli import main, prune
    directory = _unwritable_dir(tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")
    monkeypatch.setattr(prune, "load_model", no_model)
    out = os.path.join(directory, "slim.pt")
    code = main(["prune", "tiny_vgg", "--sparsity", "0.5", "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out}: cannot write in {directory}" in err, err


def test_write_errors_name_the_users_path_not_the_temporary_file(tmp_path):
    from fxprune.cli.parser import _error_line
    from fxprune.plan import write_atomic
    target = tmp_path / "plan.json"
    target.mkdir()  # os.replace(tmp, target) fails: target is a directory
    with pytest.raises(OSError) as info:
        write_atomic(str(target), "{}")
    assert info.value.filename == str(target)
    message, status = _error_line(info.value)
    assert message.startswith(f"{target}:") and ".fxprune-" not in message and status == 2
    assert os.listdir(tmp_path) == ["plan.json"]  # the temporary file is gone


def test_missing_plan_file_is_a_plan_error(tmp_path):
    from fxprune.plan import Plan
    missing = str(tmp_path / "nope.json")
    with pytest.raises(PlanError, match="does not exist.*--plan"):
        Plan.from_json(missing)


def test_logged_batches_log_at_intervals(caplog):
    from fxprune.progress import LoggedBatches
    with caplog.at_level(logging.INFO, logger="fxprune.progress"):
        assert list(LoggedBatches([1, 2, 3], "scoring (x)", interval=0.0)) == [1, 2, 3]
        assert list(LoggedBatches([1, 2, 3], "quiet", interval=3600.0)) == [1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("scoring (x): batch 1/3") and len(lines) == 3


def test_cli_scoring_logs_progress_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    import fxprune.progress
    from fxprune.cli import main
    monkeypatch.setattr(fxprune.progress, "INTERVAL_S", 0.0)
    code = main(["prune", "tiny_vgg", "--criterion", "taylor", "--sparsity", "0.5",
                 "--batches", "2", "--batch-size", "2", "--no-measure-latency", "--no-verify"])
    err = capsys.readouterr().err  # captured: not a terminal
    assert code == 0, err
    assert "fxprune: scoring (taylor): batch 2/2" in err, err


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_frontend_reaches_compile(tmp_path, capsys, frontend):
    """``--frontend`` chooses the graph capture; the report says which one ran, and
    both name the same groups."""
    kept, sizes = _prune(capsys, tmp_path, "--frontend", frontend,
                         "--report", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["frontend"] == frontend
    assert kept["features.1.0"] == sizes["features.1.0"] // 2


def test_unknown_frontend_is_refused(capsys):
    from fxprune.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "tiny_vgg", "--sparsity", "0.5", "--frontend", "jit"])
    assert exit_.value.code == 2 and "--frontend" in capsys.readouterr().err
