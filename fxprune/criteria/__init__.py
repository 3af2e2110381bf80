"""Criterion registry: one entry per saliency criterion.

A criterion turns (scoring copy of the model, calibration data, groups) into
per-parameter scores; :func:`channel_scores` (or the criterion's own ``aggregate``)
turns those into one score per channel of every group (design §5.5).

Contract of ``Criterion.score(ctx)``: reads ``ctx.module`` (a scoring copy: eval mode,
float32/float64, attention lowered to math), ``ctx.batches`` and ``ctx.loss_fn``;
returns ``{qualified parameter name: tensor of the parameter's shape}``; never mutates
the user's model.

A new criterion is one module in this package, discovered on first use: a ``score(ctx)``
function registered with the :func:`criterion` decorator (the built-ins do the same); a
data-driven one runs its per-batch step in the shared calibration loop
(:func:`.scoring.calibrate`: progress, dtype cast, loss finiteness, all-reduce).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import logging
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from ..errors import CriterionError, UnknownOptionError, did_you_mean
from ..group import Group
from ..passes.select import NORMALIZERS
from ..ranking import PLAIN_RANKING
from ..registry import Registry


@dataclass
class ScoringContext:
    """Everything a criterion may read. ``module`` is already a scoring copy."""

    module: torch.nn.Module
    groups: List[Group]
    batches: Optional[list] = None          # list of (inputs_tuple, targets)
    loss_fn: Optional[Callable] = None
    options: Dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    # Gradual steps (``compile(steps=N)``): a zero-argument callable that returns the
    # dense (unmasked) model in scoring form, with the module names of ``module``, whose
    # outputs the masked ``module`` is to reproduce (obs' dense targets); None in
    # one-shot scoring, where ``module`` is the dense model. Built on first call only.
    reference: Optional[Callable[[], torch.nn.Module]] = None
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
    # The keyword options ``score``/``aggregate``/``select`` read from ``ctx.options``
    # (e.g. ``("first_order",)``). ``None``: not declared (a user criterion registered
    # before options were declared), so any keyword is passed on unless it is a near
    # miss of the calling function's own keywords (see :func:`check_options`).
    options: Optional[Tuple[str, ...]] = None
    # compile's ``normalize`` / ``cost_aware`` for this criterion when left at "auto" in
    # one-shot pruning to a cost budget (:mod:`fxprune.ranking`), e.g. ``{"normalize":
    # None, "cost_aware": True}``; empty: score ÷ group mean.
    ranking: Dict[str, Any] = field(default_factory=dict)
    # the same for gradual pruning (``steps=``): what every step ranks by when compile's
    # ``normalize`` / ``cost_aware`` are left at "auto"; empty: score ÷ group mean.
    step_ranking: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for which in ("ranking", "step_ranking"):
            _check_ranking(self.name, which, getattr(self, which))


#: The keys of ``Criterion.ranking`` / ``step_ranking``: compile's ranking keywords.
RANKING_KEYS = tuple(PLAIN_RANKING)


def _check_ranking(name: str, which: str, ranking: Mapping[str, Any]) -> None:
    """Refuse a declared ranking with a key compile has no keyword for or a value its
    keyword refuses (a misspelt key would otherwise be ignored at every compile)."""
    for key, value in ranking.items():
        if key not in RANKING_KEYS:
            raise CriterionError(f"criterion {name!r}: {which} key {key!r} is not one of "
                                 f"{RANKING_KEYS}{did_you_mean(key, RANKING_KEYS)}")
        if key == "normalize" and value not in NORMALIZERS:
            raise CriterionError(f"criterion {name!r}: {which}['normalize']={value!r} must "
                                 f"be one of {NORMALIZERS}")
        if key == "cost_aware" and not isinstance(value, bool):
            raise CriterionError(f"criterion {name!r}: {which}['cost_aware']={value!r} "
                                 "must be True or False")


_REGISTRY = Registry("criterion")

#: Modules of this package that hold shared machinery, not criteria.
_INFRASTRUCTURE = {"aggregate", "gauss_newton", "oba_graph", "oba_ops", "oba_records",
                   "oba_tangents", "scoring", "structures"}


def register_criterion(criterion: Criterion, *, overwrite: bool = False) -> Criterion:
    """Add a criterion to the registry (users may register their own). A name taken by
    another criterion raises :class:`~fxprune.errors.DuplicateNameError` unless
    ``overwrite=True`` (the policy of every fxprune registry: :mod:`fxprune.registry`)."""
    return _REGISTRY.add(criterion.name, criterion, overwrite=overwrite)


def criterion(name: str, description: str, *, needs_data: bool = True,
              options: Optional[Tuple[str, ...]] = (), aggregate: Optional[Callable] = None,
              select: Optional[Callable] = None, overwrite: bool = False):
    """Decorator form of :func:`register_criterion` for a ``score(ctx)`` function:
    ``@criterion("l2", "L2 norm ...", needs_data=False)``. Returns the function."""
    def decorator(score: Callable[[ScoringContext], Dict[str, torch.Tensor]]):
        register_criterion(Criterion(name, description, score, needs_data=needs_data,
                                     aggregate=aggregate, select=select, options=options),
                           overwrite=overwrite)
        return score
    return decorator


log = logging.getLogger(__name__)

#: What ``criterion="auto"`` (the default of compile, saliency and the CLI) picks: the
#: criterion that kept the most accuracy in the quality benchmark when calibration data is
#: given (structured OBS with repair="full": benchmarks/quality/RESULTS.md), else the best
#: data-free one.
AUTO_CRITERION = {"data": "obs", "data-free": "l2"}


def resolve_criterion(criterion: str, has_data: bool, unstructured: bool = False) -> str:
    """``criterion`` itself, or the criterion ``"auto"`` stands for."""
    if criterion != "auto":
        return criterion
    with_data = has_data and not unstructured
    chosen = AUTO_CRITERION["data" if with_data else "data-free"]
    log.info("criterion='auto': %s (%s)", chosen, "calibration data given" if with_data
             else "no calibration data: a data-free criterion")
    return chosen


def get_criterion(name: str) -> Criterion:
    _load_builtin()
    if name not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY))
        hint = did_you_mean(name, _REGISTRY)
        raise CriterionError(f"unknown criterion {name!r}{hint}; valid criteria: {valid}")
    return _REGISTRY[name]


def list_criteria() -> Dict[str, str]:
    """{name: one-line description} of every registered criterion."""
    _load_builtin()
    return {name: c.description for name, c in sorted(_REGISTRY.items())}


def _load_builtin() -> None:
    """Import every criterion module of this package (discovered, not listed: a new
    criterion is one file here). Lazily, so that a criterion module's import cost is
    paid on first use and the modules can import this registry without a cycle."""
    global _LOADED
    if _LOADED:
        return
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


_LOADED = False


def keywords_of(fn: Callable) -> List[str]:
    """The names ``fn`` takes as keywords (not its ``*args`` / ``**kwargs``)."""
    import inspect
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def check_options(crit: Criterion, options: Mapping[str, Any], own: Iterable[str],
                  caller: str) -> None:
    """Refuse keyword arguments that neither ``caller`` (whose own keywords are ``own``)
    nor ``crit`` takes: a typo such as ``ignored=`` or ``flop=0.5`` would otherwise be
    passed to the criterion and silently ignored. Raises :class:`UnknownOptionError`
    (a ``TypeError``) naming the close matches and every valid keyword."""
    own = sorted(own)
    declared = crit.options
    for key in options:
        if declared is not None and key in declared:
            continue
        hint = did_you_mean(key, own + list(declared or ()), n=3)
        if declared is None and not hint:
            continue  # an undeclared criterion's own option
        crit_opts = ", ".join(declared) if declared else "none"
        if declared is None:
            crit_opts = "not declared (Criterion.options)"
        raise UnknownOptionError(
            f"{caller}() got an unexpected keyword argument {key!r}{hint}. Valid keywords: "
            f"{', '.join(own)}; options of criterion {crit.name!r}: {crit_opts}")
