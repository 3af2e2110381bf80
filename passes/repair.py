"""Repair pass: make the slim model match the dense one again (design §7b).

Contract: reads the dense GraphModule that was analysed, the slim GraphModule that the
rewrite made of it (same nodes, same order), the analysis and plan (to map slim
channels to dense ones) and the calibration inputs; writes only the slim model's
parameters and BatchNorm running statistics (the dense model is run, never changed;
the slim model stays in eval mode); returns a :class:`~fxprune.repair_report.RepairSummary`.
Runs after verification, which stays exact.

One sweep over the graph in topological order carries, for every calibration batch,
the dense and the slim value of each live node (values are freed after their last
use, so memory is the live activations of one graph frontier, not all activations):

* ``mode="bn"``: every batch norm (module ``BatchNorm*d`` and functional
  ``F.batch_norm`` as timm traces it) whose input changed gets the mean and unbiased
  variance of its slim input over all calibration batches;
* ``mode="full"``: also every Linear / Conv1d / Conv2d that lost input channels is
  re-fitted by least squares to the dense model's output of that layer
  (:mod:`.lstsq`), from the *already repaired* upstream, so errors do not compound.
  The damping, whether to re-fit at all, and whether a batch norm keeps its dense
  statistics or takes re-estimated ones are chosen by the error on held-out
  calibration batches (the last quarter); then the choice is fitted on all batches.
  Norm affine parameters stay valid: a re-fit aims at the dense *pre-norm* output.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import FxpruneError
from ..repair_report import LayerRepair, OutputMatch, RepairSummary
from .eval_mode import eval_mode
from . import lstsq
from .groups import Analysis, fetch_attr
from .lstsq import (LayerGram, augmented_weight, error, set_augmented_weight, solve,
                    unsupported_reason)
from .sweep import LockstepSweep

__all__ = ["REPAIR_MODES", "repair"]

log = logging.getLogger(__name__)

REPAIR_MODES = ("full", "bn", None)
#: Damping candidates (λ = α · mean diag of the Gram matrix), chosen on held-out batches.
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: Relative difference below which a batch norm's input counts as unchanged (rounding).
_UNCHANGED = {torch.float64: 1e-10, torch.float32: 1e-5}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class _Site:
    """What the sweep does at one slim node: re-estimate a batch norm or re-fit a layer."""

    kind: str                      # "bn" | "refit" | "skip"
    name: str                      # module or buffer name shown in the report
    positions: Optional[torch.Tensor]  # dense indices of the slim channels (None: all)
    buffers: Tuple[str, str] = ("", "")  # bn: running mean / var targets
    reason: str = ""


def repair(dense: torch.fx.GraphModule, slim: torch.fx.GraphModule, analysis: Analysis,
           kept: Dict[str, List[int]], inputs: Sequence[Tuple[Any, ...]],
           mode: Optional[str] = "full") -> Optional[RepairSummary]:
    """Repair ``slim`` in place against ``dense`` on calibration ``inputs`` (a list of
    input tuples, one per batch). ``mode``: ``"full"``, ``"bn"`` or ``None`` (no-op)."""
    if mode not in REPAIR_MODES:
        raise FxpruneError(f"repair={mode!r}: use 'full', 'bn' or None")
    if mode is None:
        return None
    batches = len(inputs)
    held = list(range(batches - max(1, batches // 4), batches)) if batches >= 2 else []
    summary = RepairSummary(mode, batches, len(held))
    if mode == "full" and not held:
        mode = summary.mode = "bn"
        summary.notes.append("repair='full' needs at least 2 calibration batches (one is "
                             "held out to choose the damping); did BN re-estimation only")
        log.warning(summary.notes[-1])
    train = [b for b in range(batches) if b not in held]
    sites = _plan_sites(analysis, slim, analysis.keep_mask(kept), mode)
    if not sites:
        summary.notes.append("nothing to repair: no batch norm or layer input changed")
        return summary
    with eval_mode(slim), torch.no_grad():
        measured = held or train
        before = [slim(*inputs[b]) for b in measured]
        sweep = LockstepSweep(dense, slim, inputs)
        dense_out, slim_out = sweep.run(_Repairer(sweep, train, held, summary).hooks(sites))
    summary.before = _match([dense_out[b] for b in measured], before)
    summary.after = _match([dense_out[b] for b in measured], [slim_out[b] for b in measured])
    log.info("%s", summary.table())
    return summary


# ------------------------------------------------------------------------------ sites
def _positions(analysis: Analysis, keep: np.ndarray, target: str, dim: int):
    rec = analysis.space.records.get((target, dim))
    if rec is None:
        return None
    return torch.as_tensor(np.nonzero(keep[rec.ids])[0], dtype=torch.long)


def _in_size(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _plan_sites(analysis: Analysis, slim: torch.fx.GraphModule, keep: np.ndarray,
                mode: str) -> Dict[str, _Site]:
    """Slim node name -> site, for batch norms and (``full``) layers that lost inputs."""
    slim_mods, dense_mods = dict(slim.named_modules()), dict(analysis.gm.named_modules())
    calls: Dict[str, int] = {}
    for node in slim.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    sites: Dict[str, _Site] = {}
    for node in slim.graph.nodes:
        if node.op == "call_module":
            mod, target = slim_mods[node.target], node.target
            if isinstance(mod, _BN_TYPES) and mod.running_mean is not None:
                sites[node.name] = _Site("bn", target, _positions(
                    analysis, keep, f"{target}.running_mean", 0),
                    (f"{target}.running_mean", f"{target}.running_var"))
            elif mode == "full" and hasattr(mod, "weight") and _lost_inputs(mod, dense_mods.get(target)):
                sites[node.name] = _layer_site(mod, target, calls[target],
                                               _positions(analysis, keep, f"{target}.weight", 0))
        elif node.op == "call_function" and node.target is F.batch_norm:
            bufs = _functional_bn_buffers(node)
            if bufs is not None:
                sites[node.name] = _Site("bn", bufs[0].rsplit(".", 1)[0] or bufs[0],
                                         _positions(analysis, keep, bufs[0], 0), bufs)
    return sites


def _lost_inputs(slim_mod: nn.Module, dense_mod: Optional[nn.Module]) -> bool:
    try:
        return dense_mod is not None and _in_size(slim_mod) < _in_size(dense_mod)
    except AttributeError:  # not a layer with an input size
        return False


def _layer_site(mod: nn.Module, target: str, calls: int, positions) -> _Site:
    unsupported = unsupported_reason(mod)
    if unsupported is not None:
        return _Site("skip", target, positions, reason=unsupported)
    if calls > 1:
        return _Site("skip", target, positions,
                     reason=f"called at {calls} places in the graph; re-fitting one call would "
                            "change the others")
    return _Site("refit", target, positions)


def _functional_bn_buffers(node: torch.fx.Node) -> Optional[Tuple[str, str]]:
    """Running-stat targets of an inference-mode ``F.batch_norm`` node, if it has them."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training")
    args = dict(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in names})
    mean, var = args.get("running_mean"), args.get("running_var")
    if args.get("training", False) is not False:
        return None
    if not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in (mean, var)):
        return None
    return mean.target, var.target


# ------------------------------------------------------------------------------ sweep
class _Repairer:
    """The repair actions at the sweep's sites (see the module docstring)."""

    def __init__(self, sweep: LockstepSweep, train, held, summary: RepairSummary):
        self.sweep, self.train, self.held, self.summary = sweep, train, held, summary
        self.slim_mods = dict(sweep.slim.named_modules())

    def hooks(self, sites: Dict[str, _Site]):
        return {name: (lambda ns, nd, site=site: self._apply(site, ns, nd))
                for name, site in sites.items()}

    def _apply(self, site: _Site, ns, nd) -> None:
        if site.kind == "skip":
            self.summary.layers.append(LayerRepair(site.name, "skipped", reason=site.reason))
        elif site.kind == "bn":
            record = _repair_bn(self, site, ns, nd)
            if record is not None:
                self.summary.layers.append(record)
        else:
            self.summary.layers.append(_refit(self, site, ns, nd))


# ------------------------------------------------------------------------ batch norms
def _channels(x: torch.Tensor, positions) -> torch.Tensor:
    return x if positions is None else x.index_select(1, positions.to(x.device))


def _moments(xs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and unbiased variance over every other dim of all ``xs``."""
    total = sq = None
    count = 0
    for x in xs:
        dims = [d for d in range(x.dim()) if d != 1]
        s, q = x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64)
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += x.numel() // x.shape[1]
    mean = total / count
    var = (sq - count * mean ** 2).clamp_min(0) / max(count - 1, 1)
    return mean, var


def _repair_bn(rep: _Repairer, site: _Site, ns, nd) -> Optional[LayerRepair]:
    """Re-estimate a batch norm whose input changed (``bn``), or keep whichever of the
    dense and the re-estimated statistics is closer to the dense output on held-out
    batches (``full``). Returns None when the input did not change."""
    x_s, x_d = rep.sweep.env_slim[ns.args[0]], rep.sweep.env_dense[nd.args[0]]
    ref = [_channels(x, site.positions) for x in x_d]
    diff = max(float((a - b).abs().max()) for a, b in zip(x_s, ref))
    scale = max(float(b.abs().max()) for b in ref)
    if diff <= _UNCHANGED.get(x_s[0].dtype, 1e-3) * max(scale, 1e-30):
        return None  # rounding only: a producer that lost outputs computes its kept ones
    buffers = [fetch_attr(rep.sweep.slim, t) for t in site.buffers]
    if rep.summary.mode == "bn":
        _set(buffers, _moments(x_s))
        return LayerRepair(site.name, "bn re-estimated")
    dense_stats = [b.clone() for b in buffers]
    err_dense = _bn_error(rep, site, ns, nd)
    _set(buffers, _moments([x_s[b] for b in rep.train]))
    err_new = _bn_error(rep, site, ns, nd)
    if err_new >= err_dense:
        _set(buffers, dense_stats)
        return LayerRepair(site.name, "bn kept", err_dense, err_dense)
    _set(buffers, _moments(x_s))
    return LayerRepair(site.name, "bn re-estimated", err_dense, err_new)


def _set(buffers: List[torch.Tensor], values) -> None:
    for buf, value in zip(buffers, values):
        buf.copy_(value.to(buf.dtype))


def _bn_error(rep: _Repairer, site: _Site, ns, nd) -> float:
    """Relative squared error of the slim batch norm's output on held-out batches."""
    num = den = 0.0
    for b in rep.held:
        out = rep.sweep.slim_value(ns, b)
        ref = _channels(rep.sweep.env_dense[nd][b], site.positions)
        num += float((out.double() - ref.double()).pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return num / max(den, 1e-30)


# --------------------------------------------------------------------------- re-fits
def _refit(rep: _Repairer, site: _Site, ns, nd) -> LayerRepair:
    """Least-squares re-fit of one layer toward the dense layer's output (module doc)."""
    layer = rep.slim_mods[ns.target]
    out_dim = -1 if isinstance(layer, nn.Linear) else 1
    x_s, y_d = rep.sweep.env_slim[ns.args[0]], rep.sweep.env_dense[nd]
    unknowns = _unknowns(layer)

    def gram(batches) -> LayerGram:
        g = LayerGram()
        for b in batches:
            y = y_d[b] if site.positions is None else \
                y_d[b].index_select(out_dim, site.positions.to(y_d[b].device))
            g.add(layer, x_s[b], y, max_rows=lstsq.ROWS_PER_UNKNOWN * unknowns)
        return g

    rows = sum(lstsq.row_count(layer, y_d[b]) for b in rep.train)
    if rows < unknowns:  # decided from shapes, before any Gram product is paid for
        return _too_wide(rep, site, rows, unknowns, sum(x_s[b].shape[0] for b in rep.train))
    fit, val = gram(rep.train), gram(rep.held)
    w0, has_bias = augmented_weight(layer), layer.bias is not None
    rel = lambda w: error(val, w) / max(val.yy, 1e-30)
    before = rel(w0)
    tried = [(rel(w), alpha) for alpha in ALPHAS for w in [solve(fit, w0, alpha, has_bias)]]
    best_err, best_alpha = min(tried)
    if best_err >= before:
        return LayerRepair(site.name, "kept", before, before, None, fit.rows, fit.unknowns)
    set_augmented_weight(layer, solve(fit + val, w0, best_alpha, has_bias))
    return LayerRepair(site.name, "re-fit", before, best_err, best_alpha, fit.rows, fit.unknowns)


def _too_wide(rep: _Repairer, site: _Site, rows: int, unknowns: int, samples: int) -> LayerRepair:
    """A layer with fewer calibration rows than unknowns is left as pruned, loudly."""
    need = -(-unknowns // max(1, rows // max(1, samples)))
    total = -(-need * len(rep.sweep.inputs) // max(1, len(rep.train)))
    reason = (f"{rows} calibration rows for {unknowns} unknowns per output; a re-fit needs "
              f"at least {need} training samples (about {total} in all with the held-out "
              "quarter); kept the pruned weights")
    rep.summary.notes.append(f"{site.name}: {reason}")
    log.warning("repair: %s: %s", site.name, reason)
    return LayerRepair(site.name, "skipped", None, None, None, rows, unknowns, reason)


def _unknowns(layer: nn.Module) -> int:
    """Input patch size + 1 (the bias) of one output row of ``layer``."""
    return layer.weight[0].numel() + 1


# --------------------------------------------------------------------------- outputs
def _first_float(out) -> Optional[torch.Tensor]:
    if torch.is_tensor(out):
        return out if out.is_floating_point() else None
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    for v in values:
        t = _first_float(v)
        if t is not None:
            return t
    return None


def _match(dense_outs: list, slim_outs: list) -> Optional[OutputMatch]:
    """Output agreement of slim with dense over batches (the first floating output)."""
    kl = agree = rows = 0.0
    num = den = 0.0
    for d_out, s_out in zip(dense_outs, slim_outs):
        d, s = _first_float(d_out), _first_float(s_out)
        if d is None or s is None or d.shape != s.shape or d.dim() == 0:
            return None
        d, s = d.double().reshape(-1, d.shape[-1]), s.double().reshape(-1, s.shape[-1])
        logp, logq = F.log_softmax(d, -1), F.log_softmax(s, -1)
        kl += float((logp.exp() * (logp - logq)).sum())
        agree += float((d.argmax(-1) == s.argmax(-1)).sum())
        rows += d.shape[0]
        num += float((s - d).pow(2).sum())
        den += float(d.pow(2).sum())
    if not rows:
        return None
    return OutputMatch(kl / rows, agree / rows, num / max(den, 1e-30))
