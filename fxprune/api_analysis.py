"""Public analysis API: ``fxprune.groups`` and ``fxprune.connectivity``.

Both read one cached trace and analysis per (model, example input shapes)
(:mod:`fxprune.analysis_cache`): ``groups(m, x)`` then ``connectivity(m, x)`` traces
once, and repeating either on an unchanged model does not trace again. Each call returns
its own copy of the results. ``cache=False`` traces afresh and leaves the cache alone.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from . import analysis_cache
from .errors import DataError
from .group import Group
from .passes.connectivity import Connectivity, build_connectivity
from .passes.groups import Analysis, analyze
from .passes.frontend import capture, check_model


def analyze_model(model: torch.nn.Module, example_inputs: Any, cache: bool = True,
                  **trace_kwargs) -> Analysis:
    """Trace (a copy of) ``model`` and run the channel analysis. With ``cache`` the
    result is the cached one (:mod:`fxprune.analysis_cache`): read it, do not modify it."""
    check_model(model)
    if example_inputs is None:
        raise DataError("example_inputs are required to analyse a model: pass a tensor or "
                        "tuple of tensors shaped like one batch, e.g. "
                        "fxprune.groups(model, torch.randn(1, 3, 224, 224))")
    # The GraphModule stays inside the returned Analysis and nothing writes to its
    # tensors, so it may read the user's weights instead of copies (see passes/trace.py).
    trace_kwargs.setdefault("share_params", True)
    if cache:
        return analysis_cache.cached_analysis(model, example_inputs, trace_kwargs)
    return analyze(capture(model, example_inputs, **trace_kwargs))


def groups(model: torch.nn.Module, example_inputs: Any, *, cache: bool = True,
           **trace_kwargs) -> List[Group]:
    """Coupled-channel groups of ``model`` (design §2-§3). The model is not modified.
    ``frontend="auto" | "fx" | "export"`` chooses the graph capture (passes/frontend.py);
    ``cache``: see the module docstring."""
    found = analyze_model(model, example_inputs, cache=cache, **trace_kwargs).groups
    return analysis_cache.copy_groups(found) if cache else found


def connectivity(model: torch.nn.Module, example_inputs: Optional[Any] = None, *,
                 cache: bool = True, **trace_kwargs) -> Connectivity:
    """Series/parallel table between parameter layers (design §4)."""
    check_model(model)
    trace_kwargs.setdefault("share_params", True)
    if cache:
        return analysis_cache.copy_connectivity(
            analysis_cache.cached_connectivity(model, example_inputs, trace_kwargs))
    return build_connectivity(capture(model, example_inputs, **trace_kwargs))
