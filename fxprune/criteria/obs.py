"""``"obs"``: structured Optimal Brain Surgeon on the consumers of every channel (issue 12).

The rewrite removes a channel by deleting its input columns from every layer that
consumes it; the repair pass (``repair="full"``, compile's default with data) then
re-fits each such layer by least squares toward the dense layer's output. ``"obs"``
scores a channel by the error that this removal *with* that compensation leaves:

1. One forward pass over the calibration batches (no backward; scale ``"fisher"``, below,
   adds one backward to the layer outputs per batch) with forward hooks on
   every Linear / Conv1d / Conv2d that consumes a prunable channel; each accumulates its
   input Gram ``H = Σ x̃x̃ᵀ`` with :class:`fxprune.passes.lstsq.LayerGram` (the repair
   pass's statistics, bias 1 appended, at most ``lstsq.ROWS_PER_UNKNOWN`` sampled rows
   per unknown and batch; :mod:`.obs_stats`). A layer called at several places sums all its calls.
2. Per consumer layer, greedy OBS (:mod:`fxprune.passes.obs_solve`): the input channels
   (all prunable groups feeding it) are removed cheapest first, each with the optimal
   update of the kept weights and a block downdate of ``(H + λI)⁻¹``,
   ``λ = damp · mean diag H`` (option ``damp``, default 1e-2; option ``per_step=k``
   removes the k cheapest per step, n/k steps instead of n; option ``precision``: the
   inverse and the greedy run in float32 for a float32 model, in float64 for a float64
   one, by default ``"auto"``; below). A channel's layer score is
   its error increase ``ΔE`` at its greedy step, divided by the dense layer's output
   energy ``Σ‖y‖²`` over the same rows (option ``scale="energy"``, the default; or
   weighted by the loss, ``scale="fisher"``, below), and made non-decreasing along the
   greedy order (running maximum) so that a global ranking removes a layer's channels in that order.
3. A channel's score sums its layer scores over all consumers of its group (a residual
   stream has one per block). Higher = more important, as for every criterion.

Precision (issue 12, scoring cost; issue 17, memory): the damping and the scores are
float64; the per-layer inverse and greedy, most of the time on wide layers, run in the
model's precision by default (``precision="auto"``: float32 for a float32 model, about 2x
faster on the inverses, 1.5x on the greedy; float64 for a float64 one, so the oracle
tests see the float64 path), and each layer's Gram is summed in that same dtype
(:func:`solve_dtype`: a float32 solve rounds ``H + λI`` to float32 anyway; float32 sums
halve the memory of all consumers' Grams, alive together until each layer is scored).
A float32 Cholesky that fails falls back to float64.
Measured on the quality checkpoints (``benchmarks/RESULTS.md``, obs cost section):
float32 and float64 give the same plan at kept FLOPs 0.3 on ResNet-20 and the ViT (seed
0, 32 calibration batches of 64; Spearman 1.0, median relative score difference 5e-7).

Why the output-energy scale: ``ΔE / Σ‖y‖²`` is the relative reconstruction error of
the layer, comparable across layers of any width, scale or position, needs no backward
pass and no labels, and is what the repair pass minimises. compile's default ranking
(score ÷ group mean) keeps this scale only in the sums over consumers; ``normalize=None``
uses it globally, and with ``cost_aware=True`` each channel's error is divided by the
FLOPs (parameters, ms) its removal saves: more accuracy after fine-tuning on the quality
benchmark, less post-training on the real LeNet-5 (benchmarks/quality/RESULTS.md), so it
is not the one-shot default. In gradual pruning (``steps=``) it is the default
(``Criterion.step_ranking``): every step then divides by what a channel saves from the plan
so far; with repair between steps it kept more accuracy than gradual steps ranked by
score ÷ group mean at 6 of 8 points of the quality benchmark (ResNet-20 at 0.3 / 0.14 and
the ViT at 0.14, post-training and fine-tuned; not the ViT at 0.3: benchmarks/quality/
RESULTS.md, "Cost-aware ranking at every gradual step").

Option ``scale="fisher"`` weights the error by the loss instead (issue 12, item 1): the
output error ``δy`` of a consumer is weighted per output unit ``o`` by the diagonal
empirical Fisher of the layer's output,

    F_o = mean over samples n and positions r of (∂ℓ_n/∂y_{n,r,o})²,

so that ``½ Σ_o F_o Σ_r δy²_{n,r,o}`` is the second-order (Fisher) estimate of the loss
increase of sample ``n``. Per output unit fits the closed form exactly: the compensation
is separable over output rows (every row is re-fitted against the same input Gram), so
weighting row ``o``'s objective ``‖δy_o‖² + λ‖δw_o‖²`` by ``F_o`` changes no row's
minimiser, and the weighted greedy is :func:`~fxprune.passes.obs_solve.greedy_removal`
on ``diag(√F) W`` (its ``ΔE`` is ``Σ_o F_o ΔE_o``). A weight per position and unit would
need one Gram per output unit (``o × d²``), so positions are pooled into ``F_o``. A unit's
score is its weighted greedy ``ΔE`` times ``R / (N · R_H)`` (``R`` rows of all ``N``
samples, ``R_H`` of them sampled into ``H``): ``Σ_o F_o δy_o²`` per sample, twice the
loss increase (no ½, as for OBA), comparable across layers. ``∂ℓ_n/∂y`` comes from the
gradient of each batch's loss w.r.t. the consumers' outputs times the batch's sample
count, one backward in the same pass that accumulates the Grams (no second forward):
exact for a mean-reduced loss, as samples do not interact in eval mode (any other
reduction rescales every layer alike, which leaves the ranking unchanged). It needs the
targets / the compile loss. Measured (``benchmarks/quality/RESULTS.md``, issue 12):
post-training with full repair and the default ``normalize="mean"``, ``"fisher"`` kept
less accuracy than ``"energy"`` on ResNet-20 and the ViT at kept FLOPs 0.3 and 0.14 (0.7
to 7.6 points, every seed); with ``normalize=None`` they tie except on the ViT at 0.14,
where ``"fisher"`` leads by 5.9 points. ``"energy"`` stays the default.

Option ``gram`` (issue 12, scoring cost): a conv's exact Gram is ``d x d`` for
``d = channels x kernel`` inputs, and its inverse and greedy are ``d³`` work — on resnet50
the three 4 608-wide layer4 convs took 22 of ~50 s. ``gram="kron"`` scores a conv on the
Kronecker product of the Gram's channel and kernel partial traces
(:mod:`fxprune.passes.kron_gram`): the same greedy, on a ``c x c`` problem. The default
``"auto"`` does so from :data:`KRON_MIN_UNKNOWNS` inputs on and keeps the exact Gram
below (every layer of the quality benchmark's ResNet-20). Measured with every 3x3 conv of
ResNet-20 factored (``benchmarks/quality/RESULTS.md``): the same accuracy as the exact
Gram within the seed spread.

What is not measured, and why:

* Grouped and depthwise convs (``groups > 1``) as consumers: they are pruned in whole
  conv groups, which removes their outputs too, so the removal is no input-column
  deletion with a compensating re-fit; such a channel is measured at the consumers of
  the grouped conv's outputs (same group), which is where its removal shows.
* Consumers that are not the weight of a Linear / Conv1d / Conv2d module (a functional
  ``F.linear`` on a fetched attribute, an embedding matmul), and layers with more than
  ``MAX_UNKNOWNS`` inputs (``H`` alone would exceed 2 GiB; a factored conv counts its
  input channels only, since its problem is channels x channels).
* A group none of whose consumers can be measured falls back to its channels' weight
  norms (the ``"l2"`` score) rescaled to the mean obs score of the measured channels,
  with a warning naming it. Every prunable group has a consumer (a channel that only
  reaches the model output is not prunable), so this is about odd layer types only.
* A LayerNorm between a residual stream and its consumers re-normalises over the kept
  channels after a removal (design §7); ``ΔE`` treats the consumer's input as the
  stream with the channel's columns deleted, an approximation there.

Which layers are measured and on which Gram: :mod:`.obs_consumers`.

Contract: :func:`_score` reads ``ctx.module`` (the scoring copy; hooks are removed
before returning), ``ctx.groups``, ``ctx.batches``, ``ctx.loss_fn`` (scale ``"fisher"``),
``ctx.options`` (``damp``, ``per_step``, ``scale``, ``precision``, ``gram``, ``target``)
and, in gradual steps, ``ctx.reference`` (option ``target``: each consumer reconstructs
the dense model's layer outputs, :mod:`.obs_target`); it writes
``ctx.state["obs"]`` (for scale ``"fisher"`` with ``"fisher": {layer name: F_o}``) and returns
``{consumer weight name: float64 tensor}`` holding each unit's score spread evenly over
its input columns (all other parameters are absent, i.e. score 0). :func:`_aggregate`
sums the consumer columns per channel.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import CriterionError
from ..passes.kron_gram import KronGram, kron_problem
from ..passes.lstsq import LayerGram, augmented_weight, gram_diagonal, unpack_gram
from ..passes.obs_solve import (damped_inverse, damping, greedy_removal,
                                inverse_if_positive_definite)
from . import Criterion, ScoringContext, register_criterion
from .aggregate import signed_channel_sums, weight_norms
from .obs_consumers import GRAMS, KRON_MIN_UNKNOWNS, MAX_UNKNOWNS, factored_layers, find_consumers
from .obs_stats import Gram, accumulate_grams, fisher_weights
from .obs_target import TARGETS, dense_target_problem, removed_columns

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_DAMP", "GRAMS", "KRON_MIN_UNKNOWNS", "MAX_UNKNOWNS", "PRECISIONS", "SCALES",
           "factored_layers", "find_consumers", "obs_layer_scores", "warn_unless_repaired"]

DEFAULT_DAMP = 1e-2
#: Values of option ``scale``: how a consumer's error increase is made comparable.
SCALES = {"energy": "ΔE ÷ the dense layer's output energy (default; no labels needed)",
          "fisher": "ΔE weighted per output unit by the diagonal empirical Fisher of the "
                    "layer's output (one backward per batch; needs the loss)"}
#: Values of option ``precision``: the dtype of each layer's damped inverse and greedy.
PRECISIONS = {"auto": "the layer weight's precision: float64 for float64 models, else "
                      "float32 (default)",
              "float64": "float64 inverse and greedy (the oracle-tested path)",
              "float32": "float32 inverse and greedy (about 2x faster; the Gram and the "
                         "damping stay float64; ranking close, not identical)"}
#: The repair mode whose compensation the obs error increases assume.
REPAIR_ASSUMED = "full"


def warn_unless_repaired(repair_mode: Optional[str]) -> None:
    """Log a warning when compile will not run the compensation obs scores assume."""
    if repair_mode != REPAIR_ASSUMED:
        log.warning("criterion 'obs' scores each channel by the output error left after the "
                    "least-squares compensation of repair='full', but repair=%r will not "
                    "apply it: the slim model keeps its uncompensated weights", repair_mode)


def obs_layer_scores(layer: nn.Module, gram: Gram, units: List[Tensor],
                     damp: float = DEFAULT_DAMP, per_step: int = 1,
                     weights: Optional[Tensor] = None, scale: Optional[float] = None,
                     precision: str = "auto", removed: Optional[List[int]] = None) -> Tensor:
    """``[len(units)]`` float64: each unit's greedy ``ΔE`` ÷ ``scale`` (default: the dense
    output energy), running maximum along the greedy order (module docstring, step 2).
    ``units``: each unit's columns of the design rows (a :class:`LayerGram`) or its
    input channels (a :class:`KronGram`: the factored problem of
    :func:`~fxprune.passes.kron_gram.kron_problem`, solved in float64).
    ``weights`` ``[o]`` (e.g. :func:`fisher_weights`): ``ΔE = Σ_o weights_o ΔE_o``, by the
    greedy on ``diag(√weights) W``. ``precision``: the dtype of the inverse and the
    greedy (:data:`PRECISIONS`; ``"auto"``: float64 for a float64 layer, else float32);
    the scores are float64 either way. ``removed`` (gradual steps, a ``gram`` with
    dense targets ``C``): the design columns earlier steps removed; the greedy then
    starts from the compensated weights of :mod:`.obs_target`."""
    if isinstance(gram, KronGram):
        inverse, W = kron_problem(layer, gram, damp, weights)
    elif removed is not None:
        inverse, W = dense_target_problem(layer, gram, removed, damp,
                                          solve_dtype(layer, precision), weights)
    else:
        W = augmented_weight(layer)[0].to(gram.panels[0].device)
        if weights is not None:
            W = W * weights.to(W).clamp_min(0).sqrt().reshape(-1, 1)
        if layer.bias is None:  # no constant column to compensate with, as in the re-fit
            W = W[:, :-1]
        inverse = _layer_inverse(gram, layer.bias is not None, damp,
                                 solve_dtype(layer, precision))
    order, increases = greedy_removal(inverse, W, units, per_step, overwrite=True)
    scale = max(gram.yy if scale is None else scale, 1e-30)
    out = torch.zeros(len(units), dtype=torch.float64)
    running = 0.0
    for u, inc in zip(order, increases):
        running = max(running, inc)
        out[u] = running / scale
    return out


def solve_dtype(layer: nn.Module, precision: str) -> torch.dtype:
    """The dtype of ``layer``'s inverse and greedy for option ``precision``
    (:data:`PRECISIONS`; ``"auto"``: float64 for a float64 layer, else float32). Its
    Gram is summed in the same dtype: a float32 solve rounds ``H + λI`` to float32
    anyway, and float32 sums halve the memory of all consumers' Grams, which coexist
    until each layer is scored."""
    if precision == "auto":
        precision = "float64" if layer.weight.dtype == torch.float64 else "float32"
    return getattr(torch, precision)


def _layer_inverse(gram: LayerGram, has_bias: bool, damp: float, dtype: torch.dtype) -> Tensor:
    """The damped inverse of the layer's Gram (without the constant row when the layer
    has no bias), assembled from its panels here and dropped on return, so that only the
    inverse stays alive through the greedy. A float32 solve assembles ``H + λI`` straight
    into float32 (damped in float64, then rounded: what :func:`damped_inverse` forms); a
    float64 one, or a float32 factorisation that fails, goes through
    :func:`damped_inverse` on the float64 matrix."""
    panels = [p[:1] for p in gram.panels]
    size = panels[0].shape[-1] - (0 if has_bias else 1)
    if dtype != torch.float64:
        lam = damping(gram_diagonal(panels)[0, :size], damp)
        inverse = inverse_if_positive_definite(unpack_gram(panels, dtype, lam, size)[0],
                                               overwrite=True)
        if inverse is not None:
            return inverse
        dtype = torch.float64
    return damped_inverse(unpack_gram(panels, size=size)[0], damp, dtype, overwrite=True)


def _options(ctx: ScoringContext) -> Tuple[float, int, str, str, str, str]:
    """``(damp, per_step, scale, precision, gram, target)`` from ``ctx.options``,
    validated."""
    damp = float(ctx.options.get("damp", DEFAULT_DAMP))
    if not damp >= 0:
        raise CriterionError(f"obs: damp={damp!r}; use a damping factor >= 0 (default "
                             f"{DEFAULT_DAMP}: λ = damp · mean diag of the Gram matrix)")
    per_step = ctx.options.get("per_step", 1)
    if not isinstance(per_step, int) or per_step < 1:
        raise CriterionError(f"obs: per_step={per_step!r}; use a whole number >= 1 (units "
                             "removed per greedy step of a layer; 1 is the exact greedy)")
    scale, precision, gram, target = (
        _choice(ctx, key, default, table) for key, default, table in (
            ("scale", "energy", SCALES), ("precision", "auto", PRECISIONS),
            ("gram", "auto", GRAMS), ("target", "auto", TARGETS)))
    if not ctx.batches:
        raise CriterionError("obs needs calibration data (at least one batch)")
    return damp, per_step, scale, precision, gram, target


def _choice(ctx: ScoringContext, key: str, default: str, table: Dict[str, str]) -> str:
    """Option ``key`` (one of ``table``'s keys, else a :class:`CriterionError` listing
    them with their meanings)."""
    value = ctx.options.get(key, default)
    if value not in table:
        choices = "; ".join(f"{k!r}: {v}" for k, v in table.items())
        raise CriterionError(f"obs: {key}={value!r}; choose one of {choices}")
    return value


def _score(ctx: ScoringContext) -> Dict[str, Tensor]:
    """Per consumer weight: unit scores spread over the unit's input columns."""
    damp, per_step, scale, precision, gram_kind, target = _options(ctx)
    fisher = scale == "fisher"
    consumers, skipped = find_consumers(ctx.module, ctx.groups, gram_kind)
    dtypes = {name: solve_dtype(c.layer, precision) for name, c in consumers.items()}
    factored = set(factored_layers(consumers, gram_kind))
    # gradual steps: reconstruct the dense model's layer outputs (.obs_target)
    reference = ctx.reference() if target != "masked" and ctx.reference else None
    grams, fishers, samples = accumulate_grams(ctx.module, consumers, ctx.batches,
                                               ctx.progress, ctx.loss_fn, fisher, dtypes,
                                               factored, reference)
    scored, out, weights_of = set(), {}, {}
    for name, cons in consumers.items():
        gram = grams.pop(name)  # freed after its layer: the peak falls as layers finish
        if not gram.called:
            skipped[f"{name}.weight"] = "never called on the calibration data"
            continue
        weights, div = None, None
        if fisher:  # Σ_o F_o ΔE_o x R / (N R_H): per sample (module docstring)
            weights = weights_of[name] = fisher_weights(fishers[name])
            div = samples * gram.rows / max(fishers[name].rows, 1)
        units = [torch.as_tensor(u.indices) if name in factored else u.cols
                 for u in cons.units]
        removed = None if getattr(gram, "C", None) is None else removed_columns(
            cons.layer, units, [u.indices for u in cons.units])
        values = obs_layer_scores(cons.layer, gram, units, damp, per_step, weights, div,
                                  precision, removed)
        weight = cons.layer.weight
        t = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
        for u, v in zip(cons.units, values.tolist()):
            idx = torch.as_tensor(u.indices, device=weight.device)
            t[:, idx] = v / t[:, idx].numel()
            scored.add(u.group)
        out[f"{name}.weight"] = t
    ctx.state["obs"] = {"scored_groups": scored, "skipped": skipped}
    if fisher:
        ctx.state["obs"]["fisher"] = weights_of
    for target, reason in skipped.items():
        log.info("obs: consumer %s not measured: %s", target, reason)
    return out


def _aggregate(groups, scores: Dict[str, Tensor], ctx: ScoringContext) -> Dict[str, Tensor]:
    """Per channel: the sum of its consumer columns' scores; groups with no measured
    consumer fall back to rescaled weight norms (module docstring)."""
    groups = list(groups)
    out = signed_channel_sums(groups, scores, roles=("consumer",))
    scored = ctx.state.get("obs", {}).get("scored_groups", set())
    missing = [g for g in groups if g.prunable and g.id not in scored]
    if not missing:
        return out
    measured = [out[g.id] for g in groups if g.prunable and g.id in scored]
    if not measured:
        raise CriterionError(
            "obs measured no consumer of any prunable group (it needs Linear / Conv1d / "
            "Conv2d modules that take the channels as inputs); use another criterion")
    level = float(torch.cat(measured).mean())
    norms = weight_norms(missing, ctx.module)
    log.warning("obs: no measurable consumer for group(s) %s; their channels are ranked "
                "by weight norm, rescaled to the mean obs score",
                ", ".join(g.id for g in missing))
    for g in missing:
        n = norms[g.id]
        out[g.id] = n * (level / max(float(n.mean()), 1e-30))
    return out


register_criterion(Criterion(
    name="obs",
    description="structured Optimal Brain Surgeon: output error each consumer layer keeps "
                "after removing the channel with the least-squares update (repair='full')",
    score=_score, needs_data=True, aggregate=_aggregate,
    options=("damp", "per_step", "scale", "precision", "gram", "target"),
    # gradual steps: raw relative error per FLOP saved (module docstring)
    step_ranking={"normalize": None, "cost_aware": True}))
