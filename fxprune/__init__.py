"""fxprune: second-order structured pruning as a torch.fx compiler pipeline."""
from . import passes  # noqa: F401  (fxprune.passes is the installed passes/ package)
from .api_analysis import connectivity, groups
from .errors import (AnalysisError, BudgetError, CheckpointError, CriterionError, DataError,
                     FxpruneError, TraceError)
from .group import Group, Member
from .passes.connectivity import Connectivity
from .passes.trace import register_leaf

__all__ = [
    "groups", "connectivity", "Group", "Member", "Connectivity", "register_leaf",
    "FxpruneError", "TraceError", "AnalysisError", "BudgetError", "DataError",
    "CheckpointError", "CriterionError",
]
