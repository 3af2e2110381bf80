"""Public scoring API: ``fxprune.saliency`` (design §2, §5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .criteria import Criterion, ScoringContext, check_options, get_criterion, keywords_of
from .criteria.aggregate import channel_scores
from .criteria.scoring import (as_batches, default_loss, make_scoring_copy, math_attention,
                               module_device_dtype)
from .errors import DataError, FxpruneError
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
    """The loss the criteria see: ``loss_fn(output_fn(outputs), targets)``, checked.

    Without ``loss_fn`` and ``output_fn`` a model output that is not a tensor (a dict,
    tuple or dataclass) raises :class:`DataError` saying to pass ``output_fn``. Class
    targets out of range and a loss that is not a one-element tensor (a Python float,
    a per-sample vector) raise :class:`DataError` too: each criterion differentiates the
    loss, so either would otherwise surface as a raw IndexError / RuntimeError /
    AttributeError from deep inside the criterion."""
    base = loss_fn or default_loss
    if output_fn is not None:
        inner = lambda outputs, targets: base(output_fn(outputs), targets)  # noqa: E731
    elif loss_fn is not None:
        inner = base
    else:
        inner = _default_loss_of_logits
    return lambda outputs, targets: _checked_loss(inner, outputs, targets, loss_fn is None)


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


def _default_loss_of_logits(outputs, targets):
    if not torch.is_tensor(outputs):
        raise DataError(
            f"the model returns {_describe_output(outputs)}, not a logits tensor, so the "
            "default loss (cross-entropy) cannot be computed: pass output_fn= to pick the "
            "logits (e.g. output_fn=lambda out: out['logits'], out[0] or out.logits), or a "
            "loss_fn(outputs, targets) that takes the whole output")
    return default_loss(outputs, targets)


def _describe_output(outputs) -> str:
    if isinstance(outputs, dict):
        return f"a dict with keys {sorted(map(str, outputs))}"
    if isinstance(outputs, (tuple, list)):
        return f"a {type(outputs).__name__} of {len(outputs)}"
    return f"a {type(outputs).__name__}"


def default_example_inputs(batch_list, model: torch.nn.Module):
    """The first batch's inputs, cast like the calibration batches are: floating
    tensors take the model's floating dtype (a float16 model fed float32 data)."""
    _, dtype = module_device_dtype(model)
    return tuple(x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x
                 for x in batch_list[0][0])


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
    # data-driven criteria always score a copy; data-free ones read the weights, which
    # low-precision (float16/bfloat16) models only give in a float32 copy (norms of
    # float16 weights overflow)
    _, dtype = module_device_dtype(analysis.gm)
    low = dtype in (torch.float16, torch.bfloat16)
    module = make_scoring_copy(analysis.gm) if crit.needs_data or low else analysis.gm
    ctx = ScoringContext(module=module, groups=analysis.groups, batches=batches,
                         loss_fn=loss_fn, options=dict(options), progress=progress)
    try:
        with math_attention():
            param_scores = crit.score(ctx)
    except DataError as exc:  # e.g. a non-finite loss: say so when the weights are the cause
        weights = non_finite_weights(analysis.gm)
        if weights:
            raise DataError(_weights_message(crit.name, weights)) from exc
        raise
    if crit.aggregate is not None:
        group_scores = crit.aggregate(analysis.groups, param_scores, ctx)
    else:
        group_scores = channel_scores(analysis.groups, param_scores)
    bad = _non_finite(param_scores, group_scores)
    if bad:
        raise _explain_non_finite(bad, module, crit, ctx)
    dtypes = {n: p.dtype for n, p in analysis.gm.named_parameters()}
    params = {}
    for name, p in analysis.gm.named_parameters():
        s = param_scores.get(name)
        params[name] = (s.detach().to(dtypes[name]) if s is not None else torch.zeros_like(p.detach()))
    saliency = Saliency(params, group_scores, crit.name)
    saliency.context = ctx  # kept for criteria with their own selection (SOSP-I)
    return saliency


def _non_finite(param_scores, group_scores) -> List[str]:
    bad = [f"parameter `{n}`" for n, t in param_scores.items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    bad += [f"group `{g}`" for g, t in group_scores.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
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
        with math_attention():
            scores = crit.score(one)
        group_scores = (crit.aggregate(ctx.groups, scores, one) if crit.aggregate is not None
                        else channel_scores(ctx.groups, scores))
        if _non_finite(scores, group_scores):
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


def check_not_empty(inputs) -> None:
    """Refuse example inputs holding an empty batch (a tensor with batch dimension 0):
    every FLOPs count would be 0, so a budget would "succeed" without pruning anything."""
    for i, x in enumerate(inputs):
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == 0:
            raise DataError(f"example input {i} has shape {list(x.shape)}: an empty batch "
                            "(no samples), on which FLOPs, shapes and scores mean nothing; "
                            "pass at least one sample (e.g. x[:1] of a real batch)")


def resolve_example_inputs(example_inputs: Any, batch_list, model: torch.nn.Module) -> Any:
    """``example_inputs`` as given, else the first calibration batch's inputs."""
    if example_inputs is not None:
        return example_inputs
    if batch_list is None:
        raise DataError("pass example_inputs (or data, whose first batch is used)")
    return default_example_inputs(batch_list, model)


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
    check_options(crit, options, keywords_of(saliency), "saliency")
    batch_list = prepare_batches(data, batches, crit.needs_data)
    example_inputs = resolve_example_inputs(example_inputs, batch_list, model)
    check_not_empty(as_input_tuple(example_inputs))
    gm = trace(model, as_input_tuple(example_inputs), leaf_modules=leaf_modules,
               concrete_args=concrete_args)
    analysis = analyze(gm)
    return score_analysis(analysis, crit, batch_list, wrap_loss(loss_fn, output_fn), options,
                          _progress(progress))


def _progress(progress: Optional[bool]) -> bool:
    return True if progress is None else bool(progress)


def groups_of(analysis: Analysis) -> List[Group]:
    return analysis.groups
