"""Rewrite pass: a physically smaller GraphModule (design §7).

Contract: reads an :class:`~.groups.Analysis` (the labeled graph and its groups) and
a plan ``{group id: kept channel indices}``; returns a *new* GraphModule (the
analysed one's module tree and graph are deep-copied, never modified; its tensors are
not: each becomes its slice, or a clone when nothing is removed from it, so the slim
model owns its tensors and the peak is the dense weights plus the slim ones) in which

* every parameter/buffer dimension recorded by the analysis keeps only the indices
  of kept channels (tied tensors are sliced once);
* modules are the same types with updated sizes (``in_channels``, ``groups``,
  ``normalized_shape``, ...), so the result needs neither fxprune nor timm;
* literal shape arguments baked in at trace time are patched: head counts and
  embedding sizes in ``reshape``/``view``, ``split`` sizes, ``chunk`` (rewritten to
  ``split`` with explicit sizes), ``layer_norm``/``group_norm`` arguments.

Invariant: the slim model equals the original with removed channels cut at their
consumers (checked by :mod:`.verify`).
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.fx
from torch import nn

from .groups import LABEL_KEY, Analysis
from .rewrite_rules import PATCH, RESIZE

log = logging.getLogger(__name__)


def rewrite(analysis: Analysis, kept: Dict[str, List[int]]) -> torch.fx.GraphModule:
    """Slim copy of ``analysis.gm`` keeping ``kept[group id]`` channels of each group."""
    keep = analysis.keep_mask(kept)
    old_gm = analysis.gm
    gm = copy.deepcopy(old_gm, _shared_tensors(old_gm))  # module tree and graph only
    _copy_meta(old_gm, gm)
    _own_the_rest(gm, old_gm, _slice_tensors(gm, analysis, keep))
    _update_modules(gm, old_gm)
    _patch_literals(gm, keep)
    gm.graph.lint()
    gm.recompile()
    return gm


def _shared_tensors(gm: nn.Module) -> dict:
    """A ``deepcopy`` memo under which every parameter and buffer of ``gm`` copies to
    itself: the copy is made without a dense copy of the weights (a model of W GiB
    would need 2 W before slicing), and :func:`_own_the_rest` then clones what slicing
    did not replace."""
    memo = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        memo[id(t)] = t
    return memo


def _own_the_rest(gm: nn.Module, old_gm: nn.Module, sliced: Dict[int, torch.Tensor]) -> None:
    """Point every name of a sliced tensor at its slice (``sliced``: id of the dense tensor
    -> slice), including an alias the graph never reads (GPT-2's ``transformer.wte.weight``,
    tied to the ``lm_head.weight`` both uses read), and clone every other tensor still
    shared with ``old_gm`` (ties kept), so that the slim model owns all its tensors and
    writing to it leaves the dense model alone."""
    shared = {id(t) for t in old_gm.parameters()}
    shared |= {id(t) for t in old_gm.buffers()}
    clones: Dict[int, torch.Tensor] = dict(sliced)
    for mod in gm.modules():
        for key in ("_parameters", "_buffers"):
            tensors = mod.__dict__.get(key) or {}
            for name, t in tensors.items():
                if t is None or id(t) not in shared:
                    continue
                if id(t) not in clones:
                    with torch.no_grad():
                        data = t.detach().clone()
                    clones[id(t)] = (nn.Parameter(data, requires_grad=t.requires_grad)
                                     if isinstance(t, nn.Parameter) else data)
                tensors[name] = clones[id(t)]


def _copy_meta(src: torch.fx.GraphModule, dst: torch.fx.GraphModule) -> None:
    for a, b in zip(src.graph.nodes, dst.graph.nodes):
        b.meta[LABEL_KEY] = a.meta.get(LABEL_KEY)
        if "tensor_meta" in a.meta:
            b.meta["tensor_meta"] = a.meta["tensor_meta"]


def _owner(gm: nn.Module, target: str):
    prefix, _, name = target.rpartition(".")
    return (gm.get_submodule(prefix) if prefix else gm), name


def sliced_dims(analysis: Analysis, keep: np.ndarray) -> Dict[str, List[Tuple[int, np.ndarray]]]:
    """``{target: [(dim, kept positions), ...]}``: every recorded tensor dim that loses
    indices under ``keep``, in record order (targets with nothing removed are absent).
    What the rewrite slices, and what :mod:`.carry` writes back."""
    out: Dict[str, List[Tuple[int, np.ndarray]]] = {}
    for rec in analysis.space.records.values():
        positions = np.nonzero(keep[rec.ids])[0]
        if positions.size < rec.ids.size:
            out.setdefault(rec.target, []).append((rec.dim, positions))
    return out


def _slice_tensors(gm: torch.fx.GraphModule, analysis: Analysis, keep: np.ndarray
                   ) -> Dict[int, torch.Tensor]:
    """Slice every recorded tensor dim down to the positions of kept ids; returns
    ``{id of the dense tensor: its slice}``."""
    replaced: Dict[int, torch.Tensor] = {}  # tied tensors stay tied: slice once, reuse
    for target, dims in sliced_dims(analysis, keep).items():
        module, name = _owner(gm, target)
        tensor = getattr(module, name)
        if id(tensor) in replaced:
            _assign(module, name, replaced[id(tensor)])
            continue
        new = tensor.detach()
        for dim, positions in dims:
            new = new.index_select(dim, torch.as_tensor(positions, device=new.device))
        # index_select made ``new`` a tensor of its own: no clone needed
        if isinstance(tensor, nn.Parameter):
            new = nn.Parameter(new, requires_grad=tensor.requires_grad)
        replaced[id(tensor)] = new
        _assign(module, name, new)
    return replaced


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, tensor)
    else:
        module._buffers[name] = tensor


def _update_modules(gm: torch.fx.GraphModule, old_gm: torch.fx.GraphModule) -> None:
    """Make module attributes agree with their (sliced) tensors (:data:`.rewrite_rules.RESIZE`)."""
    for name, mod in gm.named_modules():
        resize = RESIZE.for_module(mod)
        if resize is not None:
            resize(mod, old_gm.get_submodule(name))


def _patch_literals(gm: torch.fx.GraphModule, keep: np.ndarray) -> None:
    """Literal arguments baked in at trace time follow the kept channels
    (:data:`.rewrite_rules.PATCH`)."""
    for node in list(gm.graph.nodes):
        if node.op not in ("call_method", "call_function"):
            continue
        patch = PATCH.lookup(node, gm)
        if patch is not None:
            patch(gm, node, keep)
