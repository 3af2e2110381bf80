"""Public scoring API: ``fxprune.saliency`` (design §2, §5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .criteria import Criterion, ScoringContext, get_criterion
from .criteria.aggregate import channel_scores
from .criteria.scoring import as_batches, default_loss, make_scoring_copy
from .errors import DataError
from .group import Group
from .passes.groups import Analysis, analyze
from .passes.trace import as_input_tuple, trace


@dataclass
class Saliency:
    """``parameters``: per-parameter scores (parameter's shape and dtype; zeros where the
    criterion does not score). ``groups``: per-channel scores, higher = more important."""

    parameters: Dict[str, torch.Tensor]
    groups: Dict[str, torch.Tensor]
    criterion: str = ""


def wrap_loss(loss_fn: Optional[Callable], output_fn: Optional[Callable]) -> Callable:
    """The loss the criteria see: ``loss_fn(output_fn(outputs), targets)``."""
    base = loss_fn or default_loss
    if output_fn is None:
        return base
    return lambda outputs, targets: base(output_fn(outputs), targets)


def prepare_batches(data, batches: Optional[int], needed: bool):
    if data is None:
        if needed:
            raise DataError("this criterion needs calibration data: pass data=<iterable of "
                            "(inputs, targets) batches>, e.g. a DataLoader")
        return None
    return as_batches(data, batches)


def score_analysis(analysis: Analysis, crit: Criterion, batches, loss_fn, options,
                   progress: bool) -> Saliency:
    """Score an analysed graph: per-parameter scores, then per-channel scores."""
    module = make_scoring_copy(analysis.gm) if crit.needs_data else analysis.gm
    ctx = ScoringContext(module=module, groups=analysis.groups, batches=batches,
                         loss_fn=loss_fn, options=dict(options), progress=progress)
    param_scores = crit.score(ctx)
    if crit.aggregate is not None:
        group_scores = crit.aggregate(analysis.groups, param_scores, ctx)
    else:
        group_scores = channel_scores(analysis.groups, param_scores)
    dtypes = {n: p.dtype for n, p in analysis.gm.named_parameters()}
    params = {}
    for name, p in analysis.gm.named_parameters():
        s = param_scores.get(name)
        params[name] = (s.detach().to(dtypes[name]) if s is not None else torch.zeros_like(p.detach()))
    saliency = Saliency(params, group_scores, crit.name)
    saliency.context = ctx  # kept for criteria with their own selection (SOSP-I)
    return saliency


def saliency(model: torch.nn.Module, criterion: str = "oba", data: Any = None, *,
             example_inputs: Any = None, loss_fn: Optional[Callable] = None,
             batches: Optional[int] = None, output_fn: Optional[Callable] = None,
             progress: Optional[bool] = None, leaf_modules=(), concrete_args=None,
             **options) -> Saliency:
    """Per-parameter and per-channel saliencies of ``model`` under ``criterion``.

    The model is traced on a copy and never modified. ``data`` is an iterable of
    ``(inputs, targets)``; ``example_inputs`` defaults to the first batch's inputs.
    """
    crit = get_criterion(criterion)
    batch_list = prepare_batches(data, batches, crit.needs_data)
    if example_inputs is None:
        if batch_list is None:
            raise DataError("pass example_inputs (or data, whose first batch is used)")
        example_inputs = batch_list[0][0]
    gm = trace(model, as_input_tuple(example_inputs), leaf_modules=leaf_modules,
               concrete_args=concrete_args)
    analysis = analyze(gm)
    return score_analysis(analysis, crit, batch_list, wrap_loss(loss_fn, output_fn), options,
                          _progress(progress))


def _progress(progress: Optional[bool]) -> bool:
    return True if progress is None else bool(progress)


def groups_of(analysis: Analysis) -> List[Group]:
    return analysis.groups
