"""fxprune: second-order structured pruning as a torch.fx compiler pipeline.

Public API (design §2): :func:`groups`, :func:`connectivity`, :func:`saliency`,
:func:`compile`, :func:`apply_plan`, :class:`Plan`, :func:`list_criteria`; shipping a
slim model without pickle: :func:`save_slim` / :func:`load_slim` (safetensors + plan).
"""
from . import passes  # noqa: F401  (fxprune.passes is the installed passes/ package)
from .api_analysis import connectivity, groups
from .api_prune import apply_plan, compile
from .api_score import Saliency, saliency
from .criteria import Criterion, list_criteria, register_criterion
from .errors import (AnalysisError, BudgetError, CheckpointError, CriterionError, DataError,
                     DegenerateScoresError, FxpruneError, PlanError, TraceError,
                     UnknownNameError, UnknownOptionError)
from .group import Group, Member
from .passes.connectivity import Connectivity
from .passes.gradual import Gradual
from .passes.trace import register_leaf
from .plan import Plan
from .report import CompileResult, Report
from .slim_io import load_slim, save_slim

__all__ = [
    "groups", "connectivity", "saliency", "compile", "apply_plan", "list_criteria",
    "register_criterion", "Criterion", "Gradual", "Group", "Member", "Connectivity", "Plan",
    "Saliency", "CompileResult", "Report", "register_leaf", "save_slim", "load_slim",
    "FxpruneError", "TraceError", "AnalysisError", "BudgetError", "DataError",
    "CheckpointError", "CriterionError", "DegenerateScoresError", "PlanError", "UnknownOptionError", "UnknownNameError",
]
