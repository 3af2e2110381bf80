"""Public scoring API: ``fxprune.saliency`` (design §2, §5): trace -> analyse -> score."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .criteria import check_options, get_criterion, keywords_of, resolve_criterion
from .passes.groups import analyze
from .passes.score import Saliency, example_input_tuple, prepare_batches, score_analysis, wrap_loss
from .passes.frontend import capture

__all__ = ["saliency", "Saliency", "show_progress"]


def saliency(model: torch.nn.Module, criterion: str = "auto", data: Any = None, *,
             example_inputs: Any = None, loss_fn: Optional[Callable] = None,
             batches: Optional[int] = None, output_fn: Optional[Callable] = None,
             progress: Optional[bool] = None, leaf_modules=(), concrete_args=None,
             frontend: str = "auto", **options) -> Saliency:
    """Per-parameter and per-channel saliencies of ``model`` under ``criterion``.

    The model is traced on a copy and never modified. ``data`` is an iterable of
    ``(inputs, targets)``; ``example_inputs`` defaults to the first batch's inputs.
    ``criterion="auto"`` (default) is what :func:`fxprune.compile` picks: ``"obs"`` with
    ``data``, else ``"l2"``; ``Saliency.criterion`` names the one used.
    """
    crit = get_criterion(resolve_criterion(criterion, data is not None))
    check_options(crit, options, keywords_of(saliency), "saliency")
    batch_list = prepare_batches(data, batches, crit.needs_data)
    inputs = example_input_tuple(example_inputs, batch_list, model)
    analysis = analyze(capture(model, inputs, leaf_modules=leaf_modules,
                               concrete_args=concrete_args, frontend=frontend))
    return score_analysis(analysis, crit, batch_list, wrap_loss(loss_fn, output_fn, model), options,
                          show_progress(progress))


def show_progress(progress: Optional[bool]) -> bool:
    """Progress bars are on unless the caller passes ``progress=False``."""
    return True if progress is None else bool(progress)
