"""Budgets of the selection stage (design §6): one table, keyed by budget kind.

Each :class:`BudgetKind` says what its ratio means, its valid range, how a keep mask is
costed (an attribute of the :class:`~fxprune.passes.count.CostModel`, or ``None`` for a
per-group uniform budget), the report attribute that holds the achieved ratio, and
whether a decreasing list of ratios (iterative pruning) is allowed. ``compile``,
selection and the report loop over :data:`BUDGETS`; a new kind is one entry here and,
if it costs masks differently, one cost method on the cost model.

Reads: the budget keywords of ``compile``. Returns: a list of :class:`Budget` steps.
Invariant: every returned ratio is inside its kind's range; iterative lists are
strictly decreasing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..errors import BudgetError

__all__ = ["BudgetKind", "BUDGETS", "Budget", "budget_steps"]


@dataclass(frozen=True)
class BudgetKind:
    name: str
    meaning: str                  # what the ratio is, for messages and --help
    kept: bool                    # True: ratio in (0, 1] is kept; False: [0, 1) removed
    cost: Optional[str] = None    # CostModel method costing a keep mask; None = uniform
    dense_total: Optional[str] = None   # CostModel attribute: the dense model's total
    achieved: Optional[str] = None      # Report attribute: the kept ratio reached
    iterable: bool = False        # a decreasing list runs iterative pruning

    def check(self, ratio) -> float:
        """``ratio`` as a float in this kind's range, else :class:`BudgetError`."""
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise BudgetError(f"{self.name}={ratio!r} must be a number")
        if self.kept and not 0.0 < ratio <= 1.0:
            raise BudgetError(f"{self.name}={ratio} must be in (0, 1]: {self.meaning} "
                              "(0.5 keeps half)")
        if not self.kept and not 0.0 <= ratio < 1.0:
            raise BudgetError(f"{self.name}={ratio} must be in [0, 1): {self.meaning}")
        return float(ratio)


#: Every budget kind ``compile`` accepts, in the order messages list them.
BUDGETS: Dict[str, BudgetKind] = {k.name: k for k in (
    BudgetKind("flops", "the fraction of dense FLOPs kept", kept=True, cost="flops",
               dense_total="dense_flops", achieved="flops_ratio", iterable=True),
    BudgetKind("params", "the fraction of dense parameters kept", kept=True, cost="params",
               dense_total="dense_params", achieved="params_ratio", iterable=True),
    BudgetKind("sparsity", "the fraction of every group's channels removed", kept=False),
    BudgetKind("latency", "the fraction of the dense model's latency kept, predicted by "
               "a per-layer latency table measured on the model's device", kept=True,
               cost="latency", dense_total="dense_latency",
               achieved="predicted_latency_ratio", iterable=True),
)}


@dataclass
class Budget:
    kind: str          # a key of BUDGETS
    ratio: float       # kept fraction (flops, params) or removed fraction (sparsity)

    @property
    def spec(self) -> BudgetKind:
        return BUDGETS[self.kind]

    @staticmethod
    def parse(**given) -> "Budget":
        """Exactly one ``kind=ratio`` of :data:`BUDGETS` (``None`` values are not given)."""
        chosen = _one_budget(given)
        kind, ratio = chosen
        return Budget(kind, BUDGETS[kind].check(ratio))


def _one_budget(given: Dict[str, object]):
    unknown = [k for k in given if k not in BUDGETS]
    if unknown:
        raise BudgetError(f"unknown budget {unknown[0]!r}: use one of {', '.join(BUDGETS)}")
    present = [(k, v) for k, v in given.items() if v is not None]
    if len(present) != 1:
        names = ", ".join(f"{k}=r" for k in BUDGETS)
        raise BudgetError(f"give exactly one budget: {names} "
                          f"(got {', '.join(k for k, _ in present) or 'none'})")
    return present[0]


def budget_steps(**given) -> List[Budget]:
    """The budget steps of ``compile``'s keywords: one step, or for an iterable kind
    given a list, one step per (strictly decreasing) ratio."""
    kind, value = _one_budget(given)
    if not isinstance(value, (list, tuple)):
        return [Budget.parse(**{kind: value})]
    if not BUDGETS[kind].iterable:
        raise BudgetError(f"{kind} takes one number; lists (iterative pruning) work for "
                          + ", ".join(k for k, b in BUDGETS.items() if b.iterable))
    if not value or any(b >= a for a, b in zip(value, value[1:])):
        raise BudgetError(f"iterative {kind} budgets must be a non-empty, strictly "
                          f"decreasing list (got {value})")
    return [Budget(kind, BUDGETS[kind].check(v)) for v in value]
