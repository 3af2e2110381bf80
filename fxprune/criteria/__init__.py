"""Criterion registry: one entry per saliency criterion.

A criterion turns (scoring copy of the model, calibration data, groups) into
per-parameter scores; :func:`channel_scores` (or the criterion's own ``aggregate``)
turns those into one score per channel of every group (design §5.5).

Contract of ``Criterion.score(ctx)``: reads ``ctx.module`` (a scoring copy: eval mode,
float32/float64, attention lowered to math), ``ctx.batches`` and ``ctx.loss_fn``;
returns ``{qualified parameter name: tensor of the parameter's shape}``; never mutates
the user's model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from ..errors import CriterionError
from ..group import Group


@dataclass
class ScoringContext:
    """Everything a criterion may read. ``module`` is already a scoring copy."""

    module: torch.nn.Module
    groups: List[Group]
    batches: Optional[list] = None          # list of (inputs_tuple, targets)
    loss_fn: Optional[Callable] = None
    options: Dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    # Free-form results a criterion's ``score`` leaves for its ``aggregate``/``select``
    # (e.g. SOSP-I's structure matrix).
    state: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Criterion:
    name: str
    description: str
    score: Callable[[ScoringContext], Dict[str, torch.Tensor]]
    needs_data: bool = True
    # Optional override: (groups, param_scores, ctx) -> {group id: tensor[size]}
    aggregate: Optional[Callable] = None
    # Optional override of the global removal order used by budgeted selection
    # (SOSP-I's greedy selection): (groups, channel_scores, ctx, caps) -> list of
    # (group id, channel) pairs, least important first, at most caps[gid] per group.
    select: Optional[Callable] = None


_REGISTRY: Dict[str, Criterion] = {}


def register_criterion(criterion: Criterion, *, overwrite: bool = False) -> Criterion:
    """Add a criterion to the registry (users may register their own)."""
    if criterion.name in _REGISTRY and not overwrite:
        raise CriterionError(f"criterion {criterion.name!r} is already registered; "
                             "pass overwrite=True to replace it")
    _REGISTRY[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    _load_builtin()
    if name not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY))
        raise CriterionError(f"unknown criterion {name!r}; valid criteria: {valid}")
    return _REGISTRY[name]


def list_criteria() -> Dict[str, str]:
    """{name: one-line description} of every registered criterion."""
    _load_builtin()
    return {name: c.description for name, c in sorted(_REGISTRY.items())}


def _load_builtin() -> None:
    # Imported lazily so that a criterion module's import cost is paid on first use,
    # and so the built-in modules can import this registry without a cycle.
    import importlib
    for mod in ("magnitude", "oba", "sosp", "baselines"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:  # a criterion module not written yet
            if exc.name != f"{__name__}.{mod}":
                raise
