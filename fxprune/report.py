"""Compile results and the pruning report (tables and a keep-ratio plot)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .plan import Plan
from .repair_report import RepairSummary


@dataclass
class GroupRow:
    id: str
    kind: str
    size: int
    kept: int
    prunable: bool
    reason: Optional[str] = None

    @property
    def keep_ratio(self) -> float:
        return self.kept / self.size if self.size else 1.0


@dataclass
class Report:
    """FLOPs / params / latency before and after, plus per-group kept counts."""

    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    groups: List[GroupRow] = field(default_factory=list)
    predicted_flops: Optional[float] = None
    latency_before_ms: Optional[float] = None
    latency_after_ms: Optional[float] = None
    max_rel_error: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    repair: Optional[RepairSummary] = None  # what the repair pass did (last step)
    frontend: str = "fx"  # the graph's front end: "fx" (symbolic tracing) or "export"

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / max(self.flops_before, 1)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    def bottlenecks(self, factor: float = 0.5) -> List[GroupRow]:
        """Pruned groups whose pruned fraction is below ``factor`` x the median pruned
        fraction (SOSP §3.4: layers the criterion refuses to prune)."""
        rows = [r for r in self.groups if r.prunable]
        if not rows:
            return []
        median = statistics.median(1 - r.keep_ratio for r in rows)
        return [r for r in rows if median > 0 and (1 - r.keep_ratio) < factor * median]

    def table(self) -> str:
        lines = [f"{'':<12}{'before':>16}{'after':>16}{'ratio':>9}",
                 f"{'FLOPs':<12}{self.flops_before:>16,}{self.flops_after:>16,}{self.flops_ratio:>9.3f}",
                 f"{'params':<12}{self.params_before:>16,}{self.params_after:>16,}{self.params_ratio:>9.3f}"]
        if self.latency_before_ms is not None and self.latency_after_ms is not None:
            speed = self.latency_before_ms / max(self.latency_after_ms, 1e-9)
            lines.append(f"{'latency ms':<12}{self.latency_before_ms:>16.2f}"
                         f"{self.latency_after_ms:>16.2f}{speed:>8.2f}x")
        if self.max_rel_error is not None:
            lines.append(f"verified: max |slim - masked reference| / max|ref| = {self.max_rel_error:.2e}")
        flagged = {r.id for r in self.bottlenecks()}
        lines.append("")
        lines.append(f"{'group':<44}{'kind':<11}{'kept':>7}{'size':>7}{'keep':>7}")
        for r in self.groups:
            mark = "  bottleneck" if r.id in flagged else ("" if r.prunable else f"  fixed: {r.reason}")
            lines.append(f"{r.id:<44}{r.kind:<11}{r.kept:>7}{r.size:>7}{r.keep_ratio:>7.2f}{mark}")
        if self.frontend != "fx":
            lines.append(f"front end: torch.{self.frontend} (ATen graph)")
        lines.extend(self.notes)
        if self.repair is not None:
            lines.extend(["", self.repair.table()])
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> Dict[str, Any]:
        return {"flops_before": self.flops_before, "flops_after": self.flops_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "latency_before_ms": self.latency_before_ms,
                "latency_after_ms": self.latency_after_ms, "max_rel_error": self.max_rel_error,
                "groups": [r.__dict__ for r in self.groups], "notes": self.notes,
                "frontend": self.frontend,
                "repair": self.repair.to_dict() if self.repair is not None else None}

    def plot(self, path: str) -> str:
        """Bar chart of per-group keep ratios (bottlenecks highlighted) to PNG/SVG."""
        from .plot import plot_keep_ratios
        return plot_keep_ratios(self, path)


@dataclass
class CompileResult:
    module: torch.fx.GraphModule
    plan: Plan
    report: Report
    saliency: Any = None
    masks: Optional[Dict[str, torch.Tensor]] = None

    def __repr__(self) -> str:
        return (f"CompileResult(flops {self.report.flops_ratio:.3f}, params "
                f"{self.report.params_ratio:.3f}, {self.plan.removed_count()} channels removed)")


def measure_latency(module: torch.nn.Module, inputs: Tuple[Any, ...], repeats: int = 10,
                    warmup: int = 2) -> float:
    """Median wall time of a forward pass in milliseconds."""
    module = module.eval()
    on_cuda = any(torch.is_tensor(x) and x.is_cuda for x in inputs)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            module(*inputs)
            if on_cuda:  # kernels run asynchronously: wait before reading the clock
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
