"""SOSP-I statistics: the S×S Gauss-Newton structure matrix (design §5.3).

For a batch with outputs ``z`` (logits ``[N, C]``) and batch-mean loss ``L(z)``,
``G = Φᵀ (∇²_z L) Φ`` with ``Φ = ∂z/∂θ``. For mean cross-entropy ``∇²_z L`` is
block-diagonal with blocks ``R_n/N``, ``R_n = diag(p_n) − p_n p_nᵀ``, so
``G = (1/N) Σ_n φ_nᵀ R_n φ_n`` (used in closed form); for any other loss the products
``∇²_z L · u`` come from autograd (forward-over-reverse on the loss alone, cheap).

With ``u_s = Φ θ_s`` (``[N, C]`` per structure) the second-order part is
``M[s,s'] = θ_sᵀ G θ_s' = ⟨u_s, ∇²_z L u_s'⟩``. ``U = [u_1 … u_S]`` comes from one of two
Jacobian modes:

* ``"forward"``: one forward-mode JVP per structure (``torch.func.jvp`` along ``θ_s``),
  ``chunk`` structures at a time under ``torch.func.vmap``. Cost ≈ S JVPs of the batch
  (each ≈ 2-3 forwards), memory ≈ chunk × (activations + structure parameters).
  Independent of C; makes no assumption on the model.
* ``"reverse"``: per-sample Jacobians of the outputs (``vmap(jacrev)`` over samples,
  ``chunk`` samples at a time), contracted with θ per structure. Cost ≈ C per-sample
  backward passes of the batch, memory ≈ chunk·C·(structure parameters). Independent
  of S; assumes samples do not interact (true in eval mode: BN uses running stats).

``"auto"`` (default) takes ``"reverse"`` when the outputs per sample C are fewer than
the structures S (the usual case for classifiers), else ``"forward"``; if the reverse
mode fails (an op without a vmap rule), it falls back to ``"forward"`` with a warning.
After U: ``M += U (∇²L U)ᵀ`` costs O(S²·N·C) per batch and the S×S float64 matrix
``8·S²`` bytes, hence the guard ``max_structures`` (20000 by default, 3.2 GB).
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, jacrev, jvp, vmap

from ..errors import CriterionError
from ..group import Group
from .scoring import (batch_loss, calibrate, check_finite, default_loss, require_batches,
                      zero_sums)
from .structures import StructureIndex, structure_index

log = logging.getLogger(__name__)

__all__ = ["gauss_newton_terms", "structure_jacobian", "loss_curvature"]

_MODES = ("auto", "forward", "reverse")
_CHUNK_ELEMENTS = 1 << 24     # tangent / Jacobian elements per vmap call


def structure_jacobian(module: torch.nn.Module, index: StructureIndex,
                       params: Dict[str, Tensor], inputs: Sequence[Tensor], mode: str,
                       chunk: Optional[int] = None) -> Tensor:
    """``U[s] = Φ θ_s``: the directional derivative of the module's output along each
    structure, ``[S, *output.shape]`` in the output's dtype. ``mode`` is ``"forward"``
    or ``"reverse"`` (see the module docstring); ``chunk`` bounds the structures
    (forward) or samples (reverse) per vmap call."""
    names = index.names
    primals = tuple(params[n].detach() for n in names)
    numel = max(1, sum(p.numel() for p in primals))
    with torch.no_grad():
        if mode == "forward":
            return _forward_jacobian(module, index, params, names, primals, inputs,
                                     chunk or max(1, min(64, _CHUNK_ELEMENTS // numel)))
        if mode == "reverse":
            return _reverse_jacobian(module, index, names, primals, inputs, chunk, numel)
    raise CriterionError(f"jacobian={mode!r}: use one of {', '.join(_MODES)}")


def _forward_jacobian(module, index, params, names, primals, inputs, chunk) -> Tensor:
    """Chunks never straddle two groups, and only the parameters a chunk's structures
    touch become dual tensors, so the layers upstream of a group carry no tangent."""
    pieces = []
    device = primals[0].device if primals else torch.device("cpu")
    for a, b in _chunks(index, chunk):
        sids = torch.arange(a, b, device=device)
        active = [k for k, n in enumerate(names) if index.touches(n, sids)]
        act_names = [names[k] for k in active]
        act_primals = tuple(primals[k] for k in active)
        tans = index.tangents(params, sids, act_names)

        def f(*ps):
            return functional_call(module, dict(zip(act_names, ps)), tuple(inputs))

        def tangent_out(*ts):
            return jvp(f, act_primals, ts)[1]

        if len(sids) == 1:
            pieces.append(tangent_out(*(t[0] for t in tans)).unsqueeze(0))
        else:
            pieces.append(vmap(tangent_out)(*tans))
    return torch.cat(pieces)


def _chunks(index: StructureIndex, chunk: int):
    """``[a, b)`` structure ranges of at most ``chunk``, each inside one group."""
    start = 0
    for k in range(1, index.size + 1):
        if k == index.size or index.ids[k][0] != index.ids[start][0] or k - start == chunk:
            yield start, k
            start = k


def _reverse_jacobian(module, index, names, primals, inputs, chunk, numel) -> Tensor:
    def f1(ps, *xs):
        out = functional_call(module, dict(zip(names, ps)), tuple(x.unsqueeze(0) for x in xs))
        return out.squeeze(0)

    n_total = inputs[0].shape[0]
    if chunk is None:
        out_numel = f1(primals, *(x[0] for x in inputs)).numel()
        chunk = max(1, _CHUNK_ELEMENTS // (numel * out_numel))
    per_sample = vmap(jacrev(f1), in_dims=(None,) + (0,) * len(inputs))
    pieces = []
    for a in range(0, n_total, chunk):
        jac = per_sample(primals, *(x[a:a + chunk] for x in inputs))
        lead = jac[0].dim() - primals[0].dim()
        vals = {n: j * (index.sign * p) for n, j, p in zip(names, jac, primals)}
        pieces.append(index.segment_sum(vals, lead=lead).to(primals[0].dtype))
    return torch.cat(pieces).movedim(-1, 0)


def _is_cross_entropy(loss_fn: Optional[Callable], z: Tensor, targets) -> bool:
    """True when ``loss_fn`` is the default mean cross-entropy (also behind wrappers
    that record it as ``__wrapped__``, like compile's checked loss) on ``[N, C]`` logits
    with class-index targets."""
    base = None if loss_fn is None else inspect.unwrap(loss_fn)
    return ((base is None or base is default_loss) and isinstance(z, Tensor) and z.dim() == 2
            and isinstance(targets, Tensor) and not targets.is_floating_point())


def loss_curvature(z: Tensor, targets, loss_fn: Optional[Callable], U: Tensor) -> Tensor:
    """``∇²_z L · u`` for every ``u = U[s]`` (``U``: ``[S, *z.shape]``).

    Mean cross-entropy (the default loss on ``[N, C]`` logits with class indices):
    ``(p⊙u − p(pᵀu))/N`` per sample. Any other ``loss_fn``: forward-over-reverse
    autograd of ``loss_fn(z, targets)`` w.r.t. ``z``, vmapped over structures.
    """
    z = z.detach()
    if _is_cross_entropy(loss_fn, z, targets):
        return _cross_entropy_curvature(z, U)
    return _autograd_curvature(z, targets, loss_fn, U)


def _cross_entropy_curvature(z: Tensor, U: Tensor) -> Tensor:
    """``∇²_z L · u`` of the mean cross-entropy in closed form, ``(p⊙u − p(pᵀu))/N``."""
    p = F.softmax(z, dim=-1)
    pu = (p * U).sum(-1, keepdim=True)
    return (p * U - p * pu) / z.shape[0]


def _autograd_curvature(z: Tensor, targets, loss_fn: Callable, U: Tensor) -> Tensor:
    """``∇²_z L · u`` of any ``loss_fn`` by forward-over-reverse autograd."""
    grad_z = torch.func.grad(lambda zz: loss_fn(zz, targets))
    with torch.no_grad():
        return vmap(lambda w: jvp(grad_z, (z,), (w,))[1])(U.to(z.dtype))


def _check_size(index: StructureIndex, max_structures: int) -> None:
    S = index.size
    if S > max_structures:
        raise CriterionError(
            f"sosp-i: {S} structures need an {S}×{S} matrix ({8 * S * S / 2**30:.1f} GiB "
            f"in float64, O(S²·N·C) work per batch) -- more than max_structures="
            f"{max_structures}. Use criterion 'sosp-h' (linear in S), or pass "
            "max_structures=<larger> if the memory is there")
    if index.overlap:
        raise CriterionError("sosp-i: two structures share a parameter entry (overlapping "
                             "producer/bias/norm slices), so Σ_s θ_s ≠ θ_struc; use 'sosp-h'")
    if S == 0:
        raise CriterionError("sosp-i: the model has no prunable group, nothing to score")


def gauss_newton_terms(module: torch.nn.Module, groups: Iterable[Group], batches,
                       loss_fn: Optional[Callable] = None, *, jacobian: str = "auto",
                       chunk: Optional[int] = None, max_structures: int = 20000,
                       progress: bool = False, perturb: str = "weights"
                       ) -> Dict[str, object]:
    """SOSP-I statistics averaged over ``batches`` (and data-parallel ranks).

    Returns ``ids`` (``(group id, channel)`` per structure, prunable groups only),
    ``first_s`` (``θ_s·g``, ``[S]``), ``second_s`` (signed ``θ_sᵀGθ_s'``, ``[S, S]``),
    ``Q`` (``½|second_s| + diag|first_s|``), and per-parameter ``first`` (``θ⊙g``) and
    ``second`` (``θ⊙Gθ_struc``) over every named parameter; all float64. Raises
    :class:`CriterionError` above ``max_structures``, :class:`DataError` on a
    non-finite loss.
    """
    if jacobian not in _MODES:
        raise CriterionError(f"sosp-i: jacobian={jacobian!r}; use one of {', '.join(_MODES)}")
    require_batches(batches, "sosp-i")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    index = structure_index(groups, params, perturb)
    _check_size(index, max_structures)
    S, names = index.size, list(params)
    sums = zero_sums(params, "g", "h")
    device = next(iter(params.values())).device
    sums["first_s"] = torch.zeros(S, dtype=torch.float64, device=device)
    sums["second_s"] = torch.zeros(S, S, dtype=torch.float64, device=device)
    mode = jacobian

    def step(i, inputs, targets):
        nonlocal mode
        mode = _batch(module, index, params, names, (inputs, targets), loss_fn, mode, chunk,
                      sums, i)

    with torch.enable_grad():
        sums, count = calibrate(module, batches, step, sums, desc="sosp-i", progress=progress)
    first_s, second_s = sums["first_s"] / count, sums["second_s"] / count
    second_s = 0.5 * (second_s + second_s.T)     # symmetric up to rounding
    return {"ids": index.ids, "first_s": first_s, "second_s": second_s,
            "Q": 0.5 * second_s.abs() + torch.diag(first_s.abs()),
            "first": {n: sums[f"g:{n}"] / count for n in names},
            "second": {n: sums[f"h:{n}"] / count for n in names}}


def _batch(module, index, params, names, batch, loss_fn, mode, chunk, sums, i) -> str:
    """Accumulate one batch into ``sums``; returns the Jacobian mode for the next one
    (``"auto"`` resolves on the first batch; a failing automatic reverse mode falls back
    to forward mode for good)."""
    inputs, targets = batch
    plist = [params[n] for n in names]
    z = module(*inputs)
    if not isinstance(z, Tensor):
        raise CriterionError(f"sosp-i needs the model to return one tensor of logits, got "
                             f"{type(z).__name__}; pass output_fn= to pick the logits")
    loss = batch_loss(loss_fn, z, targets, i)
    grads = torch.autograd.grad(loss, plist, retain_graph=True, allow_unused=True)
    auto = mode == "auto"
    if auto:
        mode = "reverse" if z[0].numel() < index.size else "forward"
    try:
        U = structure_jacobian(module, index, params, inputs, mode, chunk)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        if not (auto and mode == "reverse"):
            raise
        log.warning("sosp-i: per-sample reverse Jacobians failed (%s); using forward-mode "
                    "JVPs per structure instead", exc)
        mode = "forward"
        U = structure_jacobian(module, index, params, inputs, mode, chunk)
    RU = loss_curvature(z, targets, loss_fn, U)
    check_finite(RU, "the Gauss-Newton products", i)
    flat_u = U.reshape(index.size, -1).to(torch.float64)
    sums["second_s"] += flat_u @ RU.reshape(index.size, -1).to(torch.float64).T
    gv = torch.autograd.grad(z, plist, RU.sum(0).to(z.dtype), allow_unused=True)
    first = {}
    for n, g, h in zip(names, grads, gv):
        theta = index.sign * params[n].detach().to(torch.float64)
        if g is not None:
            first[n] = theta * g.detach()
            sums[f"g:{n}"] += first[n]
        if h is not None:
            sums[f"h:{n}"] += theta * h
    sums["first_s"] += index.segment_sum(first)
    return mode
