"""Scoring pass (design §5): calibration batches, the loss the criteria see, and the
dispatch of one criterion over an analysed graph.

Reads: an :class:`~fxprune.passes.groups.Analysis` (its GraphModule and groups), a
registered criterion, calibration batches and a loss. Writes: nothing on the graph --
data-driven criteria (and low-precision models) score a scoring copy
(:func:`~fxprune.criteria.scoring.make_scoring_copy`); returns a :class:`Saliency`.
Invariant: the analysed graph's parameters and buffers are bit-identical afterwards,
and every returned score is finite (non-finite scores raise, naming the first batch
that makes them so).
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from ..criteria import Criterion, ScoringContext
from ..criteria.aggregate import channel_scores
from ..criteria.magnitude import all_finite
from ..criteria.scoring import (Batch, default_loss, make_scoring_copy, module_device_dtype,
                                prepare_for_scoring)
from ..errors import DataError, FxpruneError
from ..progress import logged_batches
from .groups import Analysis
from .keyword_inputs import KeywordInputs, align_batches, split_batch
from .model_loss import default_model_loss
from .lower_attention import math_attention
from .trace import as_input_tuple

__all__ = ["Saliency", "prepare_batches", "example_input_tuple", "check_not_empty",
           "wrap_loss", "score_analysis"]


@dataclass
class Saliency:
    """``parameters``: per-parameter scores (parameter's shape and dtype; zeros where the
    criterion does not score). ``groups``: per-channel scores, higher = more important.
    ``context``: the scoring context the scores came from (criteria with their own
    selection, e.g. SOSP-I, and the degenerate-score check read it)."""

    parameters: Dict[str, torch.Tensor]
    groups: Dict[str, torch.Tensor]
    criterion: str = ""
    context: Optional[ScoringContext] = field(default=None, repr=False, compare=False)


# ----------------------------------------------------------------------------- batches
def prepare_batches(data: Any, batches: Optional[int] = None, needed: bool = True
                    ) -> Optional[List[Batch]]:
    """Materialise calibration ``data`` as a list of ``(inputs_tuple, targets)``.

    ``data`` is an iterable of ``(inputs, targets)`` pairs (a ``DataLoader`` works);
    ``inputs`` is a tensor, a tuple/list of tensors or a dict of keyword inputs; a batch
    may also be one dict of keyword inputs whose ``labels`` are the targets (``None``
    without them). Dict inputs stay dicts here: :func:`example_input_tuple` orders them. At most ``batches`` batches are
    taken (all when ``None``). ``None`` data gives ``None``, or :class:`DataError` when
    the criterion ``needed`` it; so do an empty iterable and a batch that is not a pair.
    """
    if batches is not None and (isinstance(batches, bool)
                                or not isinstance(batches, numbers.Integral) or batches < 1):
        raise DataError(f"batches={batches!r}: ask for at least one calibration batch (a "
                        "whole number; None takes all of data)")
    if data is None:
        if needed:
            raise DataError("this criterion needs calibration data: pass data=<iterable of "
                            "(inputs, targets) batches>, e.g. a DataLoader")
        return None
    out: List[Batch] = []
    for i, item in enumerate(data):
        if batches is not None and len(out) >= batches:
            break
        if isinstance(item, Mapping):  # a Hugging Face batch: its labels are the targets
            inputs, targets = split_batch(item)
        elif not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"calibration batch {i} is a {type(item).__name__}, expected "
                            "an (inputs, targets) pair or a dict of keyword inputs")
        else:
            inputs, targets = item
        if not isinstance(inputs, Mapping):
            inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        out.append((inputs, targets))
    if not out:
        raise DataError("the calibration data is empty: data-driven criteria need at "
                        "least one (inputs, targets) batch")
    return out


def example_input_tuple(example_inputs: Any, batch_list, model: torch.nn.Module) -> tuple:
    """The example inputs as a tuple: as given, else the first calibration batch's inputs
    cast to the model's floating dtype (a float16 model fed float32 data). Refuses an
    empty batch (:func:`check_not_empty`). Dict inputs (of the example and of the
    batches, in place) become :class:`~.keyword_inputs.KeywordInputs` in the forward's
    parameter order (:func:`~.keyword_inputs.align_batches`)."""
    given = example_inputs is not None
    example_inputs = align_batches(model, example_inputs, batch_list)
    if not given:
        if batch_list is None:
            raise DataError("pass example_inputs (or data, whose first batch is used)")
        _, dtype = module_device_dtype(model)
        first = batch_list[0][0]
        cast = tuple(x.to(dtype) if torch.is_tensor(x) and x.is_floating_point()
                     else x for x in first)
        example_inputs = first.with_values(cast) if isinstance(first, KeywordInputs) else cast
    if isinstance(example_inputs, KeywordInputs):
        check_not_empty(example_inputs)
        return example_inputs
    inputs = as_input_tuple(example_inputs)
    check_not_empty(inputs)
    return inputs


def check_not_empty(inputs) -> None:
    """Refuse example inputs holding an empty batch (a tensor with batch dimension 0):
    every FLOPs count would be 0, so a budget would "succeed" without pruning anything."""
    for i, x in enumerate(inputs):
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == 0:
            raise DataError(f"example input {i} has shape {list(x.shape)}: an empty batch "
                            "(no samples), on which FLOPs, shapes and scores mean nothing; "
                            "pass at least one sample (e.g. x[:1] of a real batch)")


# ----------------------------------------------------------------------------- loss
def wrap_loss(loss_fn: Optional[Callable], output_fn: Optional[Callable],
              model: Optional[torch.nn.Module] = None) -> Callable:
    """The loss the criteria see: ``loss_fn(output_fn(outputs), targets)``, checked.

    Without ``loss_fn`` and ``output_fn`` the loss is :mod:`.model_loss`'s default for
    ``model``: cross-entropy of a logits tensor; a Hugging Face model's own loss on its
    ``ModelOutput``'s logits and labels; without targets, cross-entropy against the
    model's own argmax. Other outputs that are not a tensor (a dict, tuple or dataclass)
    raise :class:`DataError` saying to pass ``output_fn``. Class
    targets out of range and a loss that is not a one-element tensor (a Python float,
    a per-sample vector) raise :class:`DataError` too: each criterion differentiates the
    loss, so either would otherwise surface as a raw IndexError / RuntimeError /
    AttributeError from deep inside the criterion.

    Without ``output_fn`` the wrapper records the loss it applies to a logits tensor as
    its ``__wrapped__`` (``loss_fn``, or :func:`~fxprune.criteria.scoring.default_loss`,
    which the default model loss applies to tensor outputs), so a criterion can recognise
    the default cross-entropy behind it (``inspect.unwrap``: SOSP-I's closed-form
    curvature); with ``output_fn`` it records nothing."""
    for name, fn in (("loss_fn", loss_fn), ("output_fn", output_fn)):
        if fn is not None and not callable(fn):
            raise DataError(f"{name}={fn!r} must be a function: loss_fn(outputs, targets) "
                            "returns the scalar loss, output_fn(outputs) the logits")
    base = loss_fn or default_model_loss(model)
    if output_fn is not None:
        inner = lambda outputs, targets: base(output_fn(outputs), targets)  # noqa: E731
    elif loss_fn is not None:
        inner = base
    else:
        inner = base

    def checked(outputs, targets):
        return _checked_loss(inner, outputs, targets, loss_fn is None)

    if output_fn is None:
        checked.__wrapped__ = loss_fn if loss_fn is not None else default_loss
    return checked


def _checked_loss(inner: Callable, outputs, targets, default: bool):
    """``inner(outputs, targets)``, with its two common misuses explained."""
    try:
        loss = inner(outputs, targets)
    except IndexError as exc:  # cross_entropy / nll_loss: "Target 30 is out of bounds."
        if "out of bounds" not in str(exc):
            raise  # an IndexError of the user's own loss_fn code: its traceback says more
        raise DataError(_targets_out_of_range(outputs, targets, exc, default)) from exc
    if not torch.is_tensor(loss):
        raise DataError(
            f"the loss is a {type(loss).__name__} ({loss!r}), not a tensor computed from the "
            "model's outputs, so it cannot be differentiated: loss_fn(outputs, targets) must "
            "return a scalar tensor, e.g. F.cross_entropy(outputs, targets)")
    if loss.numel() != 1:
        raise DataError(
            f"the loss has shape {list(loss.shape)}, not a scalar: loss_fn(outputs, targets) "
            "must return the batch-mean loss (reduce it with .mean(), or reduction='mean')")
    return loss


def _targets_out_of_range(outputs, targets, exc: IndexError, default: bool) -> str:
    who = "the default loss (cross-entropy)" if default else "loss_fn"
    classes = (f"the model's {outputs.shape[-1]} outputs (class indices 0..{outputs.shape[-1] - 1})"
               if torch.is_tensor(outputs) and outputs.dim() else "the model's outputs")
    return (f"{who} failed with IndexError ({exc}): the calibration targets hold class "
            f"indices that do not fit {classes}. Check the dataset's labels and the model's "
            "num_classes (a checkpoint for another label set?), or pass a loss_fn that "
            "matches your targets")


# ----------------------------------------------------------------------------- scores
def score_analysis(analysis: Analysis, crit: Criterion, batches, loss_fn, options,
                   progress: bool, owned: bool = False, reference=None) -> Saliency:
    """Score an analysed graph: per-parameter scores, then per-channel scores.

    ``owned``: ``analysis.gm`` is the caller's own scratch module (gradual pruning's
    masked copy, used for nothing but this scoring and weight norms): it is prepared and
    scored in place instead of being copied once more. ``reference``: gradual pruning's
    dense model for :attr:`ScoringContext.reference`."""
    # data-driven criteria always score a copy; data-free ones read the weights, which
    # low-precision (float16/bfloat16) models only give in a float32 copy (norms of
    # float16 weights overflow)
    _, dtype = module_device_dtype(analysis.gm)
    low = dtype in (torch.float16, torch.bfloat16)
    module = analysis.gm
    if crit.needs_data or low:
        module = prepare_for_scoring(module) if owned else make_scoring_copy(module)
    # progress lines at intervals when no tqdm bar can be drawn (stderr not a terminal)
    ctx = ScoringContext(module=module, groups=analysis.groups,
                         batches=logged_batches(batches, f"scoring ({crit.name})", progress),
                         loss_fn=loss_fn, options=dict(options), progress=progress,
                         reference=reference)
    param_scores, group_scores = _score(crit, ctx)
    bad = _non_finite(param_scores, group_scores)
    if bad:
        raise _explain_non_finite(bad, module, crit, ctx)
    if getattr(param_scores, "lazy", False) and module is analysis.gm:
        # computed on access from the dense weights (magnitude criteria): no copy
        return Saliency(param_scores, group_scores, crit.name, context=ctx)
    params = {}
    for name, p in analysis.gm.named_parameters():
        s = param_scores.get(name)
        # unscored: a zero of the parameter's shape that takes no memory (a broadcast view)
        params[name] = (s.detach().to(p.dtype) if s is not None else
                        torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape))
    return Saliency(params, group_scores, crit.name, context=ctx)


def _score(crit: Criterion, ctx: ScoringContext):
    """One criterion on one context: (per-parameter scores, per-channel scores)."""
    try:
        with math_attention():
            param_scores = crit.score(ctx)
    except DataError as exc:  # e.g. a non-finite loss: say so when the weights are the cause
        weights = non_finite_weights(ctx.module)
        if weights:
            raise DataError(_weights_message(crit.name, weights)) from exc
        raise
    if crit.aggregate is not None:
        return param_scores, crit.aggregate(ctx.groups, param_scores, ctx)
    return param_scores, channel_scores(ctx.groups, param_scores)


def _non_finite(param_scores, group_scores) -> List[str]:
    """Names of the parameters and groups with a non-finite score. Each tensor is checked
    through its sum (:func:`~fxprune.criteria.magnitude.all_finite`: exact, one reduction
    instead of an ``isfinite`` mask per tensor); lazy scores (magnitude criteria) answer
    from the weights without being materialised."""
    finite = getattr(param_scores, "finite", None)
    if finite is not None:
        bad = [f"parameter `{n}`" for n in param_scores if not finite(n)]
    else:
        bad = [f"parameter `{n}`" for n, t in param_scores.items()
               if torch.is_tensor(t) and not all_finite(t)]
    bad += [f"group `{g}`" for g, t in group_scores.items()
            if torch.is_tensor(t) and not all_finite(t)]
    return bad


def _explain_non_finite(bad: List[str], module, crit: Criterion, ctx) -> FxpruneError:
    """Name the first calibration batch whose scores alone are not finite (re-scoring
    batch by batch: only on this failure path). No partial result is returned."""
    what = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    weights = non_finite_weights(module)
    if weights:  # the weights, not the data: say so before blaming batches or the loss
        return DataError(_weights_message(crit.name, weights))
    if not ctx.batches:
        return FxpruneError(
            f"{crit.name}: the scores of {what} are not finite (NaN or inf): the model's "
            "parameters or buffers hold NaN/inf values (a diverged checkpoint?)")
    for i, batch in enumerate(ctx.batches):
        one = ScoringContext(module=module, groups=ctx.groups, batches=[batch],
                             loss_fn=ctx.loss_fn, options=dict(ctx.options), progress=False)
        if _non_finite(*_score(crit, one)):
            return DataError(
                f"{crit.name}: the gradients or curvature on calibration batch {i} are not "
                f"finite (NaN or inf) although the loss is, which makes the scores of {what} "
                "non-finite: check that batch's inputs/targets and the loss_fn (e.g. sqrt or "
                "log at 0); no scores were returned")
    return DataError(
        f"{crit.name}: the scores of {what} are not finite (NaN or inf) although every "
        "calibration batch alone gives finite scores: the per-batch sums overflow; use "
        "float32/float64 or fewer batches")


def non_finite_weights(module: torch.nn.Module) -> List[str]:
    """``"`name` (k NaN, j inf of n)"`` for every parameter of ``module`` holding NaN/inf
    values, and every buffer holding NaN (an infinite buffer can be deliberate: an
    additive ``-inf`` attention mask). Only called on a failure path."""
    out = []
    tensors = [(n, t, "parameter") for n, t in module.named_parameters()]
    tensors += [(n, t, "buffer") for n, t in module.named_buffers()]
    for name, t, kind in tensors:
        if not t.is_floating_point():
            continue
        t = t.detach()
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or (inf and kind == "parameter"):
            out.append(f"{kind} `{name}` ({nan} NaN, {inf} inf of {t.numel()} values)")
    return out


def _weights_message(criterion: str, weights: List[str]) -> str:
    shown = "; ".join(weights[:3]) + (f"; and {len(weights) - 3} more" if len(weights) > 3 else "")
    return (f"{criterion}: the model's weights themselves are not finite: {shown}. No "
            "criterion can rank channels of such a model and its outputs are not finite "
            "either: load a finite checkpoint (a diverged run or a broken conversion does "
            "this); no scores were returned")
