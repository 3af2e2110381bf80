"""Verification: the masked-equivalence oracle (design §7).

The *reference* is the original graph with every removed channel cut at its
consumers (their input slices zeroed) and every LayerNorm that normalises across a
pruned dimension, and every ``mean(..., keepdim=True)`` statistic over one, computing
its statistics over the kept channels only. The slim
model must equal it up to float rounding. The producers' output slices of removed
channels are zeroed too: once every consumer is cut that changes nothing, and a
tensor that is both (a weight reused transposed, ``F.linear(h, enc.weight.t())``)
carries one role in the groups but must be cut in both uses. :func:`masked_reference` builds the
reference (a new GraphModule; the analysed one is untouched); :func:`check` compares;
:func:`verify_rewrite` runs the two and refuses a slim model outside the dtype's tolerance
(it runs the reference on the analysed graph itself, through an interpreter: each cut tensor
is masked into a temporary copy for the one node that reads it and each statistic over a
pruned dim is called in its masked form, so verifying copies neither the graph nor the
weights: a model of W GiB needs one layer's worth more, not W),
and :func:`slim_shapes` propagates the slim model's shapes (a failure is a rewrite bug).
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import FxpruneError, TraceError
from .eval_mode import eval_mode
from .groups import LABEL_KEY, Analysis
from .rule_table import canonical
from .shape_prop import propagate_shapes
from .random_ops import random_nodes, same_draws
from .statistics import masked_mean, statistic_mean_args

__all__ = ["verify_rewrite", "slim_shapes", "masked_reference", "check", "tolerance",
           "max_relative_error", "masked_layer_norm", "masked_channel_norm"]

log = logging.getLogger(__name__)


def masked_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, keep=None):
    """LayerNorm whose mean/variance run over the kept entries (``keep`` broadcasts
    against the normalised dims); removed entries pass through as zeros."""
    dims = tuple(range(-len(normalized_shape), 0))
    y = _masked_standardise(x, dims, eps, keep)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * keep.to(x.dtype)


def masked_channel_norm(x, dims, weight=None, bias=None, eps=1e-5, keep=None):
    """A norm with a per-channel (dim 1) affine whose statistics run over ``dims``
    (``GroupNorm(1, C)``: dims 1..; batch norm with batch statistics, as weight
    standardisation uses it: all dims but 1), over the kept entries only."""
    y = _masked_standardise(x, tuple(dims), eps, keep)
    view = [1] * x.dim()
    view[1] = -1
    if weight is not None:
        y = y * weight.reshape(view)
    if bias is not None:
        y = y + bias.reshape(view)
    return y * keep.to(x.dtype)


def _masked_standardise(x, dims, eps, keep):
    keep = keep.to(x.dtype)
    count = (keep * torch.ones_like(x)).sum(dims, keepdim=True)
    mean = (x * keep).sum(dims, keepdim=True) / count
    var = (((x - mean) * keep) ** 2).sum(dims, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps)


torch.fx.wrap("masked_layer_norm")
torch.fx.wrap("masked_channel_norm")


_CUT_ROLES = ("consumer", "producer")


def masked_reference(analysis: Analysis, kept: Dict[str, List[int]]) -> torch.fx.GraphModule:
    keep = analysis.keep_mask(kept)
    gm = copy.deepcopy(analysis.gm)
    for a, b in zip(analysis.gm.graph.nodes, gm.graph.nodes):
        b.meta[LABEL_KEY] = a.meta.get(LABEL_KEY)
        if "tensor_meta" in a.meta:
            b.meta["tensor_meta"] = a.meta["tensor_meta"]
    with torch.no_grad():
        for group in analysis.groups:
            if group.id not in kept:
                continue
            removed = sorted(set(range(group.size)) - set(kept[group.id]))
            for member in group.members:
                if member.role not in _CUT_ROLES:
                    continue
                idx = [i for c in removed for i in member.index_map[c]]
                if idx:
                    tensor = gm.get_parameter(member.target) if _is_param(gm, member.target) \
                        else gm.get_buffer(member.target)
                    tensor.index_fill_(member.dim, torch.as_tensor(idx), 0.0)
    _mask_statistics(gm, keep)
    gm.recompile()
    return gm


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _mask_statistics(gm: torch.fx.GraphModule, keep: np.ndarray) -> None:
    """Replace every statistic that runs over a pruned dim by its masked form, which
    takes it over the kept entries only: norms (LayerNorm, ``GroupNorm(1, C)``, batch
    norm with batch statistics) and ``mean(..., keepdim=True)`` (the channel rules let
    such means through: tensor_rules' ``reduce_rule``)."""
    for node in list(gm.graph.nodes):
        found = _statistic(gm, node)
        if found is None:
            continue
        fn, x, dims, args_with = found
        mask = _keep_mask_for(x, dims, keep)
        if mask is None:
            continue
        name = f"_fxprune_keep_{node.name}"
        gm.register_buffer(name, mask)
        with gm.graph.inserting_before(node):
            attr = lambda t: gm.graph.get_attr(t) if isinstance(t, str) else t  # noqa: E731
            new = gm.graph.call_function(fn, args_with(gm.graph.get_attr(name), attr))
        # the replacement carries the node's label and shape: a later LayerNorm that
        # reads it (a pre-norm block on the same residual stream) is masked too
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _statistic(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """``(masked function, input, statistics dims, args(mask, attr))`` of a node whose
    statistics may run over channels, else None. ``args`` builds the masked call's
    arguments; ``attr`` turns the qualified name of a module norm's weight or bias into
    what the caller runs on (a ``get_attr`` node, or the tensor itself)."""
    mean = statistic_mean_args(node)
    if mean is not None:
        x, dims = mean
        return masked_mean, x, dims, lambda mask, attr: (x, dims, mask)
    norm = _norm_args(gm, node)
    if norm is None:
        return None
    fn, x, dims, weight, bias, eps = norm
    shape = tuple(x.meta["tensor_meta"].shape[d] for d in dims) \
        if fn is masked_layer_norm else tuple(dims)
    return fn, x, dims, lambda mask, attr: (x, shape, attr(weight), attr(bias), eps, mask)


def _norm_args(gm, node):
    """(masked function, input, statistics dims, weight, bias, eps) of a norm node whose
    statistics may run over channels, else None. Weights are nodes or target names."""
    get = lambda i, n, d=None: node.args[i] if len(node.args) > i else node.kwargs.get(n, d)
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
        if isinstance(mod, nn.GroupNorm) and mod.num_groups != 1:
            return None
        weight = f"{node.target}.weight" if mod.weight is not None else None
        bias = f"{node.target}.bias" if mod.bias is not None else None
        nd = len(node.args[0].meta["tensor_meta"].shape)
        if isinstance(mod, nn.LayerNorm):
            dims = tuple(range(nd - len(mod.normalized_shape), nd))
            return masked_layer_norm, node.args[0], dims, weight, bias, mod.eps
        return masked_channel_norm, node.args[0], tuple(range(1, nd)), weight, bias, mod.eps
    target = canonical(node.target) if node.op == "call_function" else None
    if target not in (F.layer_norm, F.group_norm, F.batch_norm):
        return None
    x = get(0, "input")
    nd = len(x.meta["tensor_meta"].shape) if isinstance(x, torch.fx.Node) else 0
    if target is F.layer_norm:
        dims = tuple(range(nd - len(get(1, "normalized_shape")), nd))
        return masked_layer_norm, x, dims, get(2, "weight"), get(3, "bias"), get(4, "eps", 1e-5)
    if target is F.group_norm and get(1, "num_groups") == 1:
        return (masked_channel_norm, x, tuple(range(1, nd)), get(2, "weight"), get(3, "bias"),
                get(4, "eps", 1e-5))
    if target is F.batch_norm and get(5, "training", False) is True:
        dims = (0,) + tuple(range(2, nd))
        return (masked_channel_norm, x, dims, get(3, "weight"), get(4, "bias"),
                get(7, "eps", 1e-5))
    return None


def _keep_mask_for(x: torch.fx.Node, dims, keep: np.ndarray):
    """Keep mask of ``x`` over ``dims`` (size 1 along the other dims), or None when no
    index along them is removed."""
    label = x.meta.get(LABEL_KEY)
    if label is None:
        return None
    shape = tuple(x.meta["tensor_meta"].shape)
    mask = np.ones([shape[d] if d in dims else 1 for d in range(len(shape))], dtype=bool)
    changed = False
    for d in dims:
        ids = label.dims[d]
        if ids is None:
            continue
        alive = np.where(ids >= 0, keep[np.maximum(ids, 0)], True)
        if not alive.all():
            changed = True
            view = [1] * len(shape)
            view[d] = -1
            mask = mask & alive.reshape(view)
    return torch.as_tensor(mask, dtype=x.meta["tensor_meta"].dtype) if changed else None


def max_relative_error(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over (nested) tensor outputs."""
    fa, fb = _flatten(a), _flatten(b)
    if len(fa) != len(fb):
        raise FxpruneError("slim and reference outputs have a different structure")
    err, scale = 0.0, 0.0
    for x, y in zip(fa, fb):
        if x.shape != y.shape:
            raise FxpruneError(f"slim output shape {tuple(x.shape)} differs from the "
                               f"reference's {tuple(y.shape)}")
        if x.numel() == 0:
            continue
        d = (x.double() - y.double()).abs().max().item()
        s = y.double().abs().max().item()
        if math.isnan(d) or math.isnan(s):  # max() would silently drop a NaN
            return float("nan")
        err, scale = max(err, d), max(scale, s)
    return err / max(scale, 1e-30)


def _flatten(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


def check(slim: nn.Module, reference: nn.Module, inputs: Tuple[Any, ...]) -> float:
    """Relative max error between slim and reference on ``inputs``, in the models'
    own dtype (tests use float64 models for the 1e-6 oracle)."""
    with eval_mode(slim, reference), torch.no_grad():
        with same_draws(slim):
            out = slim(*inputs)
        with same_draws(reference):
            return max_relative_error(out, reference(*inputs))


def tolerance(module: nn.Module) -> float:
    """Rounding tolerance of the masked-equivalence check for a model's dtype."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    return {torch.float64: 1e-6, torch.float32: 1e-4}.get(dtype, 5e-2)


def verify_rewrite(analysis: Analysis, slim: torch.nn.Module, kept: Dict[str, List[int]],
                   inputs) -> float:
    """Masked-equivalence oracle (design §7): ``slim`` must compute what ``analysis.gm``
    computes with the removed channels masked. Returns the relative error; raises
    ``FxpruneError`` when it is above the dtype's tolerance or not finite."""
    log.info("verifying against the masked reference")
    error = _check_lean(analysis, slim, kept, inputs)
    if not math.isfinite(error):
        raise FxpruneError("verification failed: the model's output on the example "
                           "inputs is not finite (NaN or inf), so the slim model cannot "
                           "be checked; check the inputs and the model's weights")
    if error > tolerance(slim):
        sampling = random_nodes(analysis.gm)
        if sampling:
            raise FxpruneError(
                f"verification failed: slim model differs from the masked reference by "
                f"{error:.3e} (relative), and the forward draws random numbers at "
                f"{', '.join(sampling[:4])}: both runs drew from the same seed, but draws "
                "shaped by pruned channels cannot match; make the forward deterministic "
                "(pass the noise as an input), ignore= the layers whose channels shape "
                "the draws, or verify=False")
        raise FxpruneError(f"verification failed: slim model differs from the masked "
                           f"reference by {error:.3e} (relative); please report this model")
    return error


def slim_shapes(slim: torch.fx.GraphModule, inputs) -> None:
    """Shape propagation of the rewritten model. The dense model already ran on these
    inputs, so a failure here is the rewrite's, not the user's inputs'."""
    try:
        propagate_shapes(slim, inputs)
    except TraceError as exc:
        raise FxpruneError(f"the slim model fails on the example inputs that the dense model "
                           f"runs on ({exc.__cause__ or exc}): a rewrite bug; please report this "
                           "model (and prune around it meanwhile with ignore=[...])") from exc


def _check_lean(analysis: Analysis, slim: nn.Module, kept: Dict[str, List[int]], inputs) -> float:
    """:func:`check` of ``slim`` against the masked reference, run node by node on the
    analysed graph itself (module docstring): no copy of the graph or the weights. Graphs
    with a pytree calling convention (inputs flattened in generated code) are checked on
    a :func:`masked_reference` copy."""
    if type(analysis.gm.graph._codegen) is not torch.fx.graph.CodeGen:
        return check(slim, masked_reference(analysis, kept), inputs)
    gm = analysis.gm
    statistics = _statistic_calls(gm, analysis.keep_mask(kept))
    with eval_mode(gm, slim), torch.no_grad():
        with same_draws(gm):
            reference = _CutInterpreter(gm, _cuts(analysis, kept), statistics).run(*inputs)
        with same_draws(slim):
            return max_relative_error(slim(*inputs), reference)


class _Attr(str):
    """The qualified name of a tensor a masked statistic reads (a module norm's weight)."""


def _statistic_calls(gm: torch.fx.GraphModule, keep: np.ndarray) -> Dict[torch.fx.Node, tuple]:
    """``{node: (masked function, its arguments)}`` for every node that
    :func:`_mask_statistics` would replace, without changing the graph: the arguments
    hold the graph's nodes, :class:`_Attr` names and the keep mask itself."""
    out = {}
    for node in gm.graph.nodes:
        found = _statistic(gm, node)
        if found is None:
            continue
        fn, x, dims, args_with = found
        mask = _keep_mask_for(x, dims, keep)
        if mask is not None:
            out[node] = (fn, args_with(mask, lambda t: _Attr(t) if isinstance(t, str) else t))
    return out


def _cuts(analysis: Analysis, kept) -> Dict[int, list]:
    """``{id(tensor): [(dim, indices to zero), ...]}``: what :func:`masked_reference`
    zeroes, keyed by the tensor itself (a tied tensor is cut under all its names)."""
    gm, cuts = analysis.gm, {}
    for group in analysis.groups:
        if group.id not in kept:
            continue
        removed = sorted(set(range(group.size)) - set(kept[group.id]))
        for member in group.members:
            idx = [i for c in removed for i in member.index_map[c]]
            if member.role in _CUT_ROLES and idx:
                tensor = gm.get_parameter(member.target) if _is_param(gm, member.target) \
                    else gm.get_buffer(member.target)
                cuts.setdefault(id(tensor), []).append((member.dim, torch.as_tensor(idx)))
    return cuts


class _CutInterpreter(torch.fx.Interpreter):
    """Runs the graph with every cut tensor replaced, for the node that reads it, by a
    masked copy (a module's own tensors are swapped in and back around its call), and
    every statistic over a pruned dim by its masked form (``statistics``:
    :func:`_statistic_calls`)."""

    def __init__(self, gm: torch.fx.GraphModule, cuts: Dict[int, list],
                 statistics: Dict[torch.fx.Node, tuple]):
        super().__init__(gm)
        self.cuts, self.statistics = cuts, statistics

    def run_node(self, n: torch.fx.Node) -> Any:
        if n not in self.statistics:
            return super().run_node(n)
        fn, args = self.statistics[n]
        with self._set_current_node(n):
            args = [self.get_attr(a, (), {}) if isinstance(a, _Attr) else a for a in args]
            return fn(*torch.fx.node.map_arg(tuple(args), lambda m: self.env[m]))

    def _masked(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        for dim, idx in self.cuts[id(t)]:
            out.index_fill_(dim, idx.to(out.device), 0.0)
        return out

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return self._masked(value) if id(value) in self.cuts else value

    def call_module(self, target, args, kwargs):
        swapped = []
        for mod in self.fetch_attr(target).modules():
            for key in ("_parameters", "_buffers"):
                tensors = mod.__dict__.get(key) or {}
                for name, t in tensors.items():
                    if t is not None and id(t) in self.cuts:
                        swapped.append((tensors, name, t))
        try:
            for tensors, name, t in swapped:
                tensors[name] = self._masked(t)
            return super().call_module(target, args, kwargs)
        finally:
            for tensors, name, t in swapped:
                tensors[name] = t
