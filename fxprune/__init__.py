"""fxprune: second-order structured pruning as a torch.fx compiler pipeline.

Public API (design §2): :func:`groups`, :func:`connectivity`, :func:`saliency`,
:func:`compile`, :func:`apply_plan`, :class:`Plan`, :func:`list_criteria`; shipping a
slim model without pickle: :func:`save_slim` / :func:`load_slim` (safetensors + plan);
a Hugging Face folder that ``from_pretrained`` loads: :func:`save_pretrained`.

The names are imported on first use (PEP 562): ``import fxprune`` does not import torch,
so that ``fxprune --help`` and ``fxprune --version`` answer at once.
"""
import importlib
from typing import Any, Dict, List

# public name -> the module (relative to this package) that defines it
_LAZY: Dict[str, str] = {
    "groups": ".api_analysis", "connectivity": ".api_analysis",
    "compile": ".api_prune", "apply_plan": ".api_prune",
    "saliency": ".api_score", "Saliency": ".api_score",
    "list_criteria": ".criteria", "register_criterion": ".criteria", "Criterion": ".criteria",
    "Group": ".group", "Member": ".group",
    "Connectivity": ".passes.connectivity", "register_leaf": ".passes.trace",
    "Gradual": ".passes.gradual",
    "Plan": ".plan", "CompileResult": ".report", "Report": ".report",
    "save_slim": ".slim_io", "load_slim": ".api_slim", "save_pretrained": ".api_hf",
    **{name: ".errors" for name in (
        "FxpruneError", "TraceError", "AnalysisError", "BudgetError", "DataError",
        "CheckpointError", "CriterionError", "DegenerateScoresError", "PlanError",
        "UnknownOptionError", "UnknownNameError")},
}
# sub-packages reachable as attributes (``fxprune.passes`` is the installed passes/ package)
_SUBPACKAGES = ("passes", "criteria", "models", "cli")

__all__ = [
    "groups", "connectivity", "saliency", "compile", "apply_plan", "list_criteria",
    "register_criterion", "Criterion", "Gradual", "Group", "Member", "Connectivity", "Plan",
    "Saliency", "CompileResult", "Report", "register_leaf", "save_slim", "load_slim",
    "save_pretrained",
    "FxpruneError", "TraceError", "AnalysisError", "BudgetError", "DataError",
    "CheckpointError", "CriterionError", "DegenerateScoresError", "PlanError", "UnknownOptionError", "UnknownNameError",
]


def __getattr__(name: str) -> Any:
    """Import a public name (or a sub-package) on first access and cache it here."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    """The public names and sub-packages next to the module's own attributes."""
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
