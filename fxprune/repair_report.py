"""What the repair pass did (data model; filled by :mod:`fxprune.passes.repair`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["LayerRepair", "OutputMatch", "RepairSummary"]


@dataclass
class LayerRepair:
    """One repaired site. ``action``: ``"re-fit"`` (least squares, damping ``alpha``),
    ``"kept"`` (re-fit did not lower the held-out error), ``"skipped"`` (``reason``),
    ``"bn re-estimated"`` or ``"bn kept"`` (the dense statistics were better on held-out
    data). Errors are relative squared errors against the dense model's output of this
    layer (``Σ‖slim − dense‖² / Σ‖dense‖²``) on the held-out calibration batches."""

    name: str
    action: str
    error_before: Optional[float] = None
    error_after: Optional[float] = None
    alpha: Optional[float] = None
    rows: Optional[int] = None
    unknowns: Optional[int] = None
    reason: Optional[str] = None


@dataclass
class OutputMatch:
    """How close the slim model's outputs are to the dense model's: mean KL divergence
    of the softmax over the last dim (dense ‖ slim), top-1 agreement, and the relative
    squared error of the raw outputs."""

    kl: float
    agreement: float
    rel_error: float


@dataclass
class RepairSummary:
    mode: str
    batches: int
    held_out: int
    layers: List[LayerRepair] = field(default_factory=list)
    before: Optional[OutputMatch] = None
    after: Optional[OutputMatch] = None
    notes: List[str] = field(default_factory=list)

    def table(self) -> str:
        where = (f"{self.held_out} held-out of {self.batches} calibration batches"
                 if self.held_out else f"all {self.batches} calibration batches (none held out)")
        lines = [f"repair ({self.mode}), measured on {where}:"]
        if self.before is not None and self.after is not None:
            b, a = self.before, self.after
            lines.append(f"  output KL to dense {b.kl:.4g} -> {a.kl:.4g}, top-1 agreement "
                         f"{b.agreement:.3f} -> {a.agreement:.3f}, relative error "
                         f"{b.rel_error:.4g} -> {a.rel_error:.4g}")
        lines.append(f"  {'site':<40}{'action':<18}{'error before':>14}{'after':>10}")
        for r in self.layers:
            act = r.action + (f" a={r.alpha:g}" if r.alpha is not None else "")
            fmt = lambda v: f"{v:.4f}" if v is not None else "-"
            extra = f"  ({r.reason})" if r.reason else ""
            lines.append(f"  {r.name:<40}{act:<18}{fmt(r.error_before):>14}"
                         f"{fmt(r.error_after):>10}{extra}")
        lines.extend("  " + n for n in self.notes)
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Dict[str, Any]) -> "RepairSummary":
        """Inverse of :meth:`to_dict` (a saved report read back)."""
        match = lambda d: OutputMatch(**d) if d else None
        return RepairSummary(data["mode"], data["batches"], data["held_out"],
                             [LayerRepair(**r) for r in data.get("layers", [])],
                             match(data.get("before")), match(data.get("after")),
                             list(data.get("notes", [])))
