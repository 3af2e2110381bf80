"""Data-driven baselines (design §5.4): ``"taylor"`` and ``"obd"``.

``"taylor"``: per parameter ``θ⊙ḡ`` with ``ḡ`` the gradient of the batch-mean loss
averaged over the calibration batches; per channel ``|Σ θ·ḡ|`` over every member slice
of the group (the default aggregation, design §5.5) -- the first-order loss change of
removing the channel.

``"obd"`` (Optimal Brain Damage with the empirical Fisher): per parameter
``½ θ² F_ii`` with ``F_ii = (1/N) Σ_n (∂ℓ_n/∂θ_i)²`` over all N calibration samples;
per channel the sum over every member slice. Per-sample gradients come from
``torch.func.vmap(torch.func.grad(...))`` over samples (``chunk`` samples per call,
memory ≈ chunk × parameters); option ``per_sample="loop"`` runs one backward per sample
instead (slow but works for any model), and ``"auto"`` (default) falls back to the loop
when vmap fails. Each sample's loss is ``loss_fn`` on a batch of one, which is ℓ_n for
mean- or sum-reduced losses.

Both score the scoring copy in eval mode with the shared calibration loop
(:func:`~.scoring.calibrate`: every batch's loss checked for NaN/inf, sums all-reduced
over data-parallel ranks, design §8).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from ..errors import CriterionError, DataError
from . import ScoringContext, criterion
from .scoring import batch_loss, calibrate, default_loss, zero_sums

log = logging.getLogger(__name__)

__all__ = ["taylor_scores", "obd_scores", "per_sample_grads"]

_CHUNK_ELEMENTS = 1 << 25


def _trainable(module: torch.nn.Module) -> Dict[str, Tensor]:
    """The parameters that are scored (frozen ones get no score)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def taylor_scores(module: torch.nn.Module, batches, loss_fn: Optional[Callable] = None, *,
                  progress: bool = False) -> Dict[str, Tensor]:
    """``{name: θ⊙ḡ}`` over every parameter (parameter dtype), ḡ averaged over batches."""
    params = _trainable(module)
    names = list(params)
    sums = zero_sums(params)

    def step(i, inputs, targets):
        with torch.enable_grad():
            loss = batch_loss(loss_fn, module(*inputs), targets, i)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                sums[n] += g.detach()

    sums, count = calibrate(module, batches, step, sums, desc="taylor", progress=progress)
    return {n: (p.detach() * (sums[n] / count)).to(p.dtype) for n, p in params.items()}


def per_sample_grads(module: torch.nn.Module, params: Dict[str, Tensor], inputs, targets,
                     loss_fn: Callable, mode: str = "vmap",
                     chunk: Optional[int] = None) -> List[Dict[str, Tensor]]:
    """Per-sample gradients ``∂ℓ_n/∂θ`` as a list of ``{name: [n, *shape]}`` chunks.

    ``mode="vmap"``: ``vmap(grad)`` over ``chunk`` samples at a time (default: as many
    as fit in ~32M gradient elements). ``mode="loop"``: one backward per sample.
    """
    if targets is None:  # a dict batch without labels (passes/keyword_inputs.py)
        raise DataError("per-sample gradients (obd) need per-sample targets, and this "
                        "calibration batch has none: give every batch its labels "
                        "(a 'labels' entry of a dict batch), or use taylor/oba/obs")
    names = list(params)
    primals = {n: p.detach() for n, p in params.items()}
    n_total = inputs[0].shape[0]
    if mode == "loop":
        out = []
        for k in range(n_total):
            xs = tuple(x[k:k + 1] for x in inputs)
            loss = loss_fn(module(*xs), targets[k:k + 1])
            gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            out.append({n: (torch.zeros_like(params[n]) if g is None else g).unsqueeze(0)
                        for n, g in zip(names, gs)})
        return out

    def sample_loss(ps, *xt):
        *xs, t = xt
        out = functional_call(module, ps, tuple(x.unsqueeze(0) for x in xs))
        return loss_fn(out, t.unsqueeze(0))

    numel = max(1, sum(p.numel() for p in primals.values()))
    chunk = chunk or max(1, _CHUNK_ELEMENTS // numel)
    fn = vmap(grad(sample_loss), in_dims=(None,) + (0,) * (len(inputs) + 1))
    return [fn(primals, *(x[a:a + chunk] for x in inputs), targets[a:a + chunk])
            for a in range(0, n_total, chunk)]


def obd_scores(module: torch.nn.Module, batches, loss_fn: Optional[Callable] = None, *,
               per_sample: str = "auto", chunk: Optional[int] = None,
               progress: bool = False) -> Dict[str, Tensor]:
    """``{name: ½ θ² F_ii}`` with the empirical diagonal Fisher over all samples."""
    if per_sample not in ("auto", "vmap", "loop"):
        raise CriterionError(f"obd: per_sample={per_sample!r}; use 'auto', 'vmap' or 'loop'")
    loss_fn = loss_fn or default_loss
    params = _trainable(module)
    sums = zero_sums(params)
    mode = "vmap" if per_sample == "auto" else per_sample  # "loop" for good after a failure

    def step(i, inputs, targets):
        nonlocal mode
        batch_loss(loss_fn, module(*inputs), targets, i)
        try:
            with torch.enable_grad():
                pieces = per_sample_grads(module, params, inputs, targets, loss_fn, mode,
                                          chunk)
        except RuntimeError as exc:
            if per_sample != "auto" or mode == "loop":
                raise
            log.warning("obd: vmap per-sample gradients failed (%s); using one backward "
                        "per sample", exc)
            mode = "loop"
            with torch.enable_grad():
                pieces = per_sample_grads(module, params, inputs, targets, loss_fn, "loop")
        for piece in pieces:
            for n, g in piece.items():
                sums[n] += g.detach().to(torch.float64).pow(2).sum(0)
        return inputs[0].shape[0]

    sums, samples = calibrate(module, batches, step, sums, desc="obd", progress=progress)
    return {n: (0.5 * p.detach().pow(2) * (sums[n] / samples)).to(p.dtype)
            for n, p in params.items()}


@criterion("taylor", "first-order Taylor: |Σ θ·g| over every member slice of a channel, g "
                     "averaged over the calibration batches", options=())
def _score_taylor(ctx: ScoringContext) -> Dict[str, Tensor]:
    return taylor_scores(ctx.module, ctx.batches, ctx.loss_fn, progress=ctx.progress)


@criterion("obd", "Optimal Brain Damage: ½ Σ θ²·diag empirical Fisher (per-sample "
                  "gradients over all calibration samples)", options=("per_sample", "chunk"))
def _score_obd(ctx: ScoringContext) -> Dict[str, Tensor]:
    return obd_scores(ctx.module, ctx.batches, ctx.loss_fn,
                      per_sample=ctx.options.get("per_sample", "auto"),
                      chunk=ctx.options.get("chunk"), progress=ctx.progress)
