"""How compile ranks channels across groups: ``normalize`` and ``cost_aware``.

Contract: :func:`resolve_ranking` reads the criterion, the two options as the caller gave
them and the kind of pruning, and returns the ``(normalize, cost_aware)`` selection uses,
or raises :class:`~fxprune.errors.BudgetError` before any scoring where an explicit value
cannot apply. It reads and writes nothing else.

``"auto"`` (the default of both) takes the criterion's own ranking where it applies --
pruning by the global order to a flops / params / latency budget: ``Criterion.ranking``
one-shot, ``Criterion.step_ranking`` at every step of gradual pruning (``steps=``, which
divides by the savings on the plan so far: :mod:`fxprune.passes.gradual`) -- and score ÷
group mean without costs everywhere else (uniform or unstructured pruning, sparsity
budgets, criteria that order channels themselves). A registered criterion declares the
ranking its scores are meant for; which built-in declares which follows the quality
benchmark (benchmarks/quality/RESULTS.md). The two options
are one choice: an explicit value of one that differs from the criterion's ranking
drops the other back to the plain default, so ``normalize="mean"`` alone never pairs
with a cost-aware order that was only measured on raw scores.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .errors import BudgetError
from .passes.select import DEFAULT_NORMALIZE, check_normalize

__all__ = ["AUTO", "PLAIN_RANKING", "resolve_ranking", "cost_budget_blocker"]

AUTO = "auto"
#: The ranking of every criterion without one of its own, and wherever a criterion's
#: ranking does not apply.
PLAIN_RANKING: Dict[str, Any] = {"normalize": DEFAULT_NORMALIZE, "cost_aware": False}


def resolve_ranking(crit, normalize, cost_aware, *, steps=None, uniform: bool = False,
                    unstructured: bool = False, sparsity=None) -> Tuple[Optional[str], bool]:
    """``(normalize, cost_aware)`` for selection (module docstring)."""
    blocker = _cost_aware_blocker(crit, uniform, unstructured, sparsity)
    given: Dict[str, Any] = {}
    if normalize != AUTO:
        check_normalize(normalize)
        given["normalize"] = normalize
    if cost_aware != AUTO:
        if not isinstance(cost_aware, bool):
            raise BudgetError(f"cost_aware={cost_aware!r} must be True, False or 'auto'")
        if cost_aware and blocker is not None:
            raise BudgetError(blocker)
        given["cost_aware"] = cost_aware
    declared = crit.ranking if steps is None else crit.step_ranking
    own = {**PLAIN_RANKING, **(declared if blocker is None else {})}
    base = own if all(own[k] == v for k, v in given.items()) else PLAIN_RANKING
    chosen = {**base, **given}
    return chosen["normalize"], chosen["cost_aware"]


def _cost_aware_blocker(crit, uniform: bool, unstructured: bool,
                        sparsity) -> Optional[str]:
    """Why this pruning is not by the global order to a cost budget (what an explicit
    ``cost_aware=True`` is refused with), or None where it is (one-shot or per step)."""
    if crit.select is not None:
        return (f"cost_aware=True re-ranks the global order, but criterion {crit.name!r} "
                "selects channels itself; drop cost_aware")
    return cost_budget_blocker("cost_aware", uniform, unstructured, sparsity)


def cost_budget_blocker(option: str, uniform: bool, unstructured: bool,
                        sparsity) -> Optional[str]:
    """Why ``option=True`` (an option of the selection by an order to a flops / params /
    latency budget: ``cost_aware``, ``fill``) cannot apply to this pruning, or None."""
    if uniform or unstructured:
        return (f"{option}=True works on the order of a flops/params/latency budget; it "
                "does not combine with uniform=True or unstructured=True")
    if sparsity is not None:
        return (f"{option}=True needs a cost budget, but a sparsity budget has no cost (it "
                "removes a fraction of every group); use flops=, params= or latency=, or "
                f"drop {option}")
    return None
