"""Calibration statistics of the ``"obs"`` criterion (:mod:`.obs`): one pass over the data.

Contract: :func:`accumulate_grams` reads a module and its consumer layers (``{layer
name: object with .layer}``, from :func:`.obs.find_consumers`) and the calibration
batches; it returns each consumer's :class:`~fxprune.passes.lstsq.LayerGram` (input Gram
and dense output energy, at most :data:`fxprune.passes.lstsq.ROWS_PER_UNKNOWN` sampled
rows per unknown and batch, as the repair pass; for ``gram="kron"`` layers the factors of
the same rows, :class:`~fxprune.passes.kron_gram.KronGram`) and, for ``scale="fisher"``, its
:class:`OutputFisher` (the diagonal empirical Fisher of the layer's output, from one
backward per batch in the same pass), summed over batches and data-parallel ranks.
Invariant: one forward per batch; hooks are removed before returning; no parameter
``.grad`` is written and the module is otherwise untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..passes import lstsq
from ..passes.kron_gram import KronGram
from ..passes.lstsq import LayerGram
from .scoring import all_reduce_sums, batch_loss, cast_batch, check_finite, progress_iter

__all__ = ["Gram", "OutputFisher", "accumulate_grams", "fisher_weights"]

#: A consumer's statistics: the exact input Gram, or its channel ⊗ kernel factors.
Gram = Union[LayerGram, KronGram]


@dataclass
class OutputFisher:
    """Sums for one consumer's diagonal empirical output Fisher (module docstring)."""

    sq: Optional[Tensor] = None    # [o]: Σ over rows of (n_batch · ∂L/∂y)²
    rows: int = 0                  # rows (samples x positions) of every call

    def add(self, layer: nn.Module, grad: Tensor, n_samples: int) -> None:
        """Accumulate ``grad`` (∂ batch loss / ∂ output of one call) of a batch of
        ``n_samples``; output units are dim -1 of a Linear's output, dim 1 of a conv's."""
        g = grad.detach().double() * n_samples
        g = g.movedim(1, -1) if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else g
        g = g.reshape(-1, g.shape[-1])
        sq = g.pow(2).sum(0)
        self.sq = sq if self.sq is None else self.sq + sq
        self.rows += g.shape[0]


def _samples(inputs) -> int:
    """Samples of a batch: the leading dim of its first tensor input."""
    return next((int(x.shape[0]) for x in inputs if torch.is_tensor(x) and x.dim()), 1)


def accumulate_grams(module: nn.Module, consumers: Dict[str, object], batches,
                     progress: bool = False, loss_fn=None, fisher: bool = False,
                     dtypes: Optional[Dict[str, torch.dtype]] = None,
                     factored: Collection[str] = (), reference: Optional[nn.Module] = None
                     ) -> Tuple[Dict[str, Gram], Dict[str, OutputFisher], int]:
    """One forward per batch (no grad unless ``fisher``); every consumer's
    :class:`LayerGram` (input Gram, dense output energy), or for the layers named in
    ``factored`` its :class:`~fxprune.passes.kron_gram.KronGram` (the channel ⊗ kernel
    factors of the same rows), and, with ``fisher``, its :class:`OutputFisher` from one
    backward of the batch loss (``loss_fn``) to the consumers' outputs in the same pass;
    summed over batches and data-parallel ranks. ``dtypes``: the dtype each consumer's
    ``H`` is summed in (default float64). ``reference`` (gradual steps: the dense model,
    same module names): each batch runs through it first, and every unfactored
    consumer's Gram also sums the cross term ``C`` toward the *reference* layer's
    outputs on the same batch (its ``yy`` is then their energy), the targets of
    :func:`~fxprune.criteria.obs.obs_layer_scores`' dense-target problem. Returns
    ``(grams, fishers, samples)``. Hooks are removed before returning; ``module`` is
    otherwise untouched (no parameter ``.grad`` is written)."""
    dtypes = dtypes or {}
    grams: Dict[str, Gram] = {
        name: KronGram() if name in factored else LayerGram(dtype=dtypes.get(name, torch.float64))
        for name in consumers}
    fishers = {name: OutputFisher() for name in consumers}
    outputs: List[Tuple[str, Tensor]] = []

    # the reference layers' outputs of one batch, per unfactored consumer
    dense_outs: Dict[str, List[Tensor]] = {} if reference is None else {
        name: [] for name in consumers if name not in factored}

    def hook_for(name: str):
        rows = lstsq.ROWS_PER_UNKNOWN * (consumers[name].layer.weight[0].numel() + 1)
        extra = {} if name in factored else {"cross": name in dense_outs}  # C: dense targets

        def hook(mod, inputs, output):
            y = dense_outs[name].pop(0) if name in dense_outs else output.detach()
            grams[name].add(mod, inputs[0].detach(), y, max_rows=rows, **extra)
            if fisher and output.requires_grad:
                outputs.append((name, output))
        return hook

    def target_hook_for(name: str):
        def hook(mod, inputs, output):  # a layer called twice pops its calls in order
            dense_outs[name].append(output.detach())
        return hook

    handles = [c.layer.register_forward_hook(hook_for(n)) for n, c in consumers.items()]
    if dense_outs:
        ref_mods = dict(reference.named_modules())
        handles += [ref_mods[n].register_forward_hook(target_hook_for(n)) for n in dense_outs]
    samples = 0
    try:
        with torch.set_grad_enabled(fisher):
            for i, batch in enumerate(progress_iter(batches, progress, "obs")):
                inputs, targets = cast_batch(batch, module)
                for k, x in enumerate(inputs):
                    if torch.is_tensor(x) and x.is_floating_point():
                        check_finite(x, f"calibration input {k}", i)
                if dense_outs:
                    for calls in dense_outs.values():
                        calls.clear()  # nothing left over from a batch that failed
                    with torch.no_grad():
                        reference(*inputs)
                out = module(*inputs)
                n = _samples(inputs)
                samples += n
                if fisher:
                    _output_fisher(consumers, fishers, outputs, batch_loss(loss_fn, out,
                                                                           targets, i), n)
    finally:
        for h in handles:
            h.remove()
    outs = {n: int(c.layer.weight.shape[0]) for n, c in consumers.items()}
    return _reduce(grams, fishers, samples, fisher, outs)


def _output_fisher(consumers, fishers, outputs, loss: Tensor, n: int) -> None:
    """Backward of one batch's ``loss`` to the recorded consumer outputs (then cleared);
    an output the loss does not reach has gradient 0."""
    grads = torch.autograd.grad(loss, [o for _, o in outputs], allow_unused=True)
    for (name, o), g in zip(outputs, grads):
        fishers[name].add(consumers[name].layer, torch.zeros_like(o) if g is None else g, n)
    outputs.clear()


def _gram_sums(g: Gram) -> List[Tensor]:
    """The tensors a Gram's sums live in (what the ranks all-reduce)."""
    if isinstance(g, KronGram):
        return [g.A, g.B, g.s]
    return list(g.panels) + ([] if g.C is None else [g.C])


def _set_gram_sums(g: Gram, sums: List[Tensor]) -> None:
    if isinstance(g, KronGram):
        g.A, g.B, g.s = sums
    else:
        n = len(g.panels)
        g.panels, g.C = sums[:n], (sums[n] if g.C is not None else None)


def _reduce(grams, fishers, samples: int, fisher: bool, outputs: Dict[str, int]):
    """All-reduce the per-rank sums (design §8); returns ``(grams, fishers, samples)``.
    ``outputs``: each layer's output units (the size of ``F`` where no gradient came)."""
    sums = {}
    for name, g in grams.items():
        if g.called:
            parts = _gram_sums(g)
            dev = parts[0].device
            sums.update({f"{name}:H{k}": p for k, p in enumerate(parts)})
            sums[f"{name}:yy"] = torch.tensor([g.yy, g.rows], dtype=torch.float64,
                                              device=dev)
            if fisher:
                f = fishers[name]  # no gradient reached it: F = 0
                sums[f"{name}:F"] = (f.sq.to(dev) if f.sq is not None else
                                     torch.zeros(outputs[name], dtype=torch.float64,
                                                 device=dev))
                sums[f"{name}:rows"] = torch.tensor([f.rows], dtype=torch.float64,
                                                    device=dev)
    sums, samples = all_reduce_sums(sums, samples)
    for name, g in grams.items():
        if g.called:
            _set_gram_sums(g, [sums[f"{name}:H{k}"] for k in range(len(_gram_sums(g)))])
            g.yy, g.rows = float(sums[f"{name}:yy"][0]), int(sums[f"{name}:yy"][1])
            if fisher:
                fishers[name].sq = sums[f"{name}:F"]
                fishers[name].rows = int(sums[f"{name}:rows"][0])
    return grams, fishers, samples


def fisher_weights(fisher: OutputFisher) -> Tensor:
    """``F_o``: the mean over all rows (samples x positions) of ``(∂ℓ_n/∂y_o)²``."""
    return fisher.sq / max(fisher.rows, 1)
