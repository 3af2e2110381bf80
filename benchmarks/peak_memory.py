"""Peak memory of one call, for the benchmark scripts (imported as a sibling module:
``python benchmarks/bench_*.py`` puts this folder on the path).

CPU: the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the figure is
the growth of ``VmHWM`` over the resident set at the start -- ``getrusage().ru_maxrss``
cannot be reset, so a set-up peak (importing torch, building the model) would hide the
call's own peak. CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at the start.
"""
import sys
from typing import Callable

import torch


def _status_mib(field: str) -> float:
    """A memory field (``VmRSS``, ``VmHWM``) of ``/proc/self/status`` in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth_mib(fn: Callable[[], object], device: str = "cpu") -> float:
    """Run ``fn()``; return its peak memory (MiB) above the level when it started."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        print("warning: cannot reset the peak RSS; figures include set-up", file=sys.stderr)
    base = _status_mib("VmRSS")
    fn()
    return _status_mib("VmHWM") - base
