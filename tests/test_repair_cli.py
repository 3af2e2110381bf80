"""``fxprune prune --repair``: the repair table in the report, and auto mode's choice."""
import os
import subprocess
import sys


def _prune(*extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    args = ["tiny_resnet", "--input-size", "3,16,16", "--flops", "0.6", "--criterion", "l2",
            "--batches", "4", "--batch-size", "4", "--no-measure-latency", *extra]
    return subprocess.run([sys.executable, "-m", "fxprune.cli", "prune", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_repair_full_prints_what_it_did():
    proc = _prune("--repair", "full")
    assert proc.returncode == 0, proc.stderr
    assert "repair (full), measured on 1 held-out of 4 calibration batches" in proc.stdout
    assert "re-fit" in proc.stdout


def test_auto_repair_is_off_on_synthetic_data_and_says_so():
    proc = _prune()
    assert proc.returncode == 0, proc.stderr
    assert "repair (" not in proc.stdout
    assert "repair: off on the synthetic default data" in proc.stderr
