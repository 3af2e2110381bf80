"""Nothing half-written (issue: robustness): plans, reports and plots are written
atomically; a failure at any point leaves the old file or no file, and no temporary."""
import os

import pytest
import torch

import fxprune
from fxprune.models import create_model, model_input_size
from fxprune.plan import write_atomic

@pytest.fixture
def plan_and_report():
    torch.manual_seed(0)
    model = create_model("tiny_vgg").eval()
    res = fxprune.compile(model, "l2", example_inputs=torch.randn(2, *model_input_size("tiny_vgg")),
                          flops=0.6)
    return res.plan, res.report


def _leftovers(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith(".fxprune-"))


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace", "interrupt"])
def test_failed_plan_write_leaves_no_partial_file(tmp_path, monkeypatch, plan_and_report, fail_at):
    plan, _ = plan_and_report
    fresh = tmp_path / "new.json"
    existing = tmp_path / "old.json"
    existing.write_text("previous content")
    exc = KeyboardInterrupt if fail_at == "interrupt" else OSError
    if fail_at in ("write", "interrupt"):
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return self.fh.__exit__(*a)

            def write(self, data):
                self.fh.write(data[: len(data) // 2])  # half of it lands, then it fails
                self.fh.flush()
                raise exc("disk full")

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    elif fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    else:
        monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("busy")))
    for path in (fresh, existing):
        with pytest.raises(exc):
            plan.to_json(str(path))
    monkeypatch.undo()
    assert not fresh.exists()
    assert existing.read_text() == "previous content"
    assert _leftovers(tmp_path) == []
    plan.to_json(str(fresh))  # and it works once the disk is back
    assert fxprune.Plan.from_json(str(fresh)).kept == plan.kept


def test_failed_report_plot_leaves_no_partial_file(tmp_path, monkeypatch, plan_and_report):
    pytest.importorskip("matplotlib")
    _, report = plan_and_report
    with pytest.raises(ValueError):  # unknown image format: nothing is written
        report.plot(str(tmp_path / "chart.unknownformat"))
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("busy")))
    with pytest.raises(OSError):
        report.plot(str(tmp_path / "chart.png"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == []
    report.plot(str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert _leftovers(tmp_path) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    """mkstemp creates 0600 files; a plan written atomically must be as readable as
    one written with open() (0666 minus the umask)."""
    path = tmp_path / "plan.json"
    write_atomic(str(path), "{}")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_write_into_missing_directory_is_a_clean_error(tmp_path, plan_and_report):
    plan, _ = plan_and_report
    with pytest.raises(FileNotFoundError):
        plan.to_json(str(tmp_path / "missing" / "plan.json"))
    assert os.listdir(tmp_path) == []
