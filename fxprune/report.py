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
    latency_speedup_range: Optional[List[float]] = None  # lowest, highest per-round speedup
    # the per-layer latency table's prediction (passes/latency_table.py), dense and slim
    predicted_latency_before_ms: Optional[float] = None
    predicted_latency_after_ms: Optional[float] = None
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

    @property
    def predicted_latency_ratio(self) -> Optional[float]:
        """Slim / dense latency as the latency table predicts it (None without one)."""
        if self.predicted_latency_before_ms is None or self.predicted_latency_after_ms is None:
            return None
        return self.predicted_latency_after_ms / max(self.predicted_latency_before_ms, 1e-12)

    @property
    def measured_latency_ratio(self) -> Optional[float]:
        """Slim / dense latency as timed for the report (None when not measured)."""
        if self.latency_before_ms is None or self.latency_after_ms is None:
            return None
        return self.latency_after_ms / max(self.latency_before_ms, 1e-12)

    def note_shortfall(self, kind: str, target: float, achieved_attr: Optional[str],
                       filled: bool = False) -> None:
        """Say why the achieved ratio (attribute ``achieved_attr``; None for a budget
        without one, e.g. sparsity) is well below the target: channel units are coarse
        (and, unless ``filled``, that ``fill=True`` gives the slack back)."""
        if achieved_attr is None:
            return
        achieved = getattr(self, achieved_attr)
        if achieved is not None and target - achieved > 0.02:
            self.notes.append(
                f"{kind}: kept {achieved:.3f} for a target of {target}: channel "
                "granularity - removing the next lowest-ranked unit (a whole head, conv "
                "group or channel of a small layer) overshoots the budget"
                + ("" if filled else "; fill=True (CLI --fill) gives back removed "
                   "channels while the budget holds"))

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
            lines.extend(latency_lines(self.latency_before_ms, self.latency_after_ms,
                                       self.latency_speedup_range))
        lines.extend(self._predicted_latency_lines())
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

    def _predicted_latency_lines(self) -> List[str]:
        """The latency table's prediction, and predicted vs measured ratio when timed."""
        predicted = self.predicted_latency_ratio
        if predicted is None:
            return []
        lines = [f"{'latency est':<12}{self.predicted_latency_before_ms:>16.2f}"
                 f"{self.predicted_latency_after_ms:>16.2f}{predicted:>9.3f}"
                 "  (ms, per-layer latency table)"]
        measured = self.measured_latency_ratio
        lines.append(f"latency ratio slim/dense: predicted {predicted:.3f}"
                     + (f", measured {measured:.3f}" if measured is not None
                        else " (not measured)"))
        return lines

    def to_dict(self) -> Dict[str, Any]:
        return {"flops_before": self.flops_before, "flops_after": self.flops_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "latency_before_ms": self.latency_before_ms,
                "latency_after_ms": self.latency_after_ms,
                "latency_speedup_range": self.latency_speedup_range,
                "predicted_latency_before_ms": self.predicted_latency_before_ms,
                "predicted_latency_after_ms": self.predicted_latency_after_ms,
                "max_rel_error": self.max_rel_error,
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


# the speedups of the rounds may differ by this fraction of their median before the
# latency figure is flagged as unreliable (load from other processes, frequency scaling)
UNRELIABLE_SPREAD = 0.25


def measure_latency(dense: torch.nn.Module, slim: torch.nn.Module, inputs: Tuple[Any, ...],
                    rounds: int = 7, repeats: int = 5, warmup: int = 2,
                    clock=time.perf_counter) -> Dict[str, Any]:
    """Forward-pass latency of ``dense`` and ``slim`` timed interleaved: each of
    ``rounds`` rounds times ``repeats`` passes of one model, then of the other (the order
    alternates between rounds), so that a load spike slows both and not just whichever
    model happened to be measured at the time. Returns the medians over the rounds (ms)
    and the lowest and highest per-round speedup ``dense / slim``."""
    dense, slim = dense.eval(), slim.eval()
    on_cuda = any(torch.is_tensor(x) and x.is_cuda for x in inputs)

    def once(module) -> float:
        start = clock()
        module(*inputs)
        if on_cuda:  # kernels run asynchronously: wait before reading the clock
            torch.cuda.synchronize()
        return (clock() - start) * 1e3

    per_round: Dict[str, List[float]] = {"dense": [], "slim": []}
    with torch.no_grad():
        for module in (dense, slim):
            for _ in range(warmup):
                once(module)
        for r in range(rounds):
            order = (("dense", dense), ("slim", slim)) if r % 2 == 0 else (("slim", slim), ("dense", dense))
            for name, module in order:
                per_round[name].append(statistics.median(once(module) for _ in range(repeats)))
    speedups = [d / max(s, 1e-9) for d, s in zip(per_round["dense"], per_round["slim"])]
    return {"before_ms": statistics.median(per_round["dense"]),
            "after_ms": statistics.median(per_round["slim"]),
            "speedup_range": [min(speedups), max(speedups)], "rounds": rounds}


def latency_lines(before: float, after: float, speedup_range: Optional[List[float]]) -> List[str]:
    """The report's latency row, and a warning when the rounds disagree too much."""
    speed = before / max(after, 1e-9)
    row = f"{'latency ms':<12}{before:>16.2f}{after:>16.2f}{speed:>8.2f}x"
    if not speedup_range:
        return [row]
    low, high = speedup_range
    row += f"  (rounds {low:.2f}-{high:.2f}x)"
    if (high - low) > UNRELIABLE_SPREAD * speed:
        return [row, f"latency: unreliable, the per-round speedup ranged {low:.2f}-{high:.2f}x "
                     "(other load on the machine?); re-run on an idle machine"]
    return [row]
