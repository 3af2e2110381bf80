"""fxprune: second-order structured pruning as a torch.fx compiler pipeline.

Public API (design §2): :func:`groups`, :func:`connectivity`, :func:`saliency`,
:func:`compile`, :func:`apply_plan`, :class:`Plan`, :func:`list_criteria`.
"""
from . import passes  # noqa: F401  (fxprune.passes is the installed passes/ package)
from .api_analysis import connectivity, groups
from .api_prune import apply_plan, compile
from .api_score import Saliency, saliency
from .criteria import Criterion, list_criteria, register_criterion
from .errors import (AnalysisError, BudgetError, CheckpointError, CriterionError, DataError,
                     DegenerateScoresError, FxpruneError, TraceError)
from .group import Group, Member
from .passes.connectivity import Connectivity
from .passes.trace import register_leaf
from .plan import Plan
from .report import CompileResult, Report

__all__ = [
    "groups", "connectivity", "saliency", "compile", "apply_plan", "list_criteria",
    "register_criterion", "Criterion", "Group", "Member", "Connectivity", "Plan",
    "Saliency", "CompileResult", "Report", "register_leaf",
    "FxpruneError", "TraceError", "AnalysisError", "BudgetError", "DataError",
    "CheckpointError", "CriterionError", "DegenerateScoresError",
]
