"""Rewrite pass: a physically smaller GraphModule (design §7).

Contract: reads an :class:`~.groups.Analysis` (the labeled graph and its groups) and
a plan ``{group id: kept channel indices}``; returns a *new* GraphModule (the
analysed one is deep-copied, never modified) in which

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
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .groups import LABEL_KEY, Analysis
from .labels import TLabel, dim_ids
from .rule_table import canonical, target_name

log = logging.getLogger(__name__)


def rewrite(analysis: Analysis, kept: Dict[str, List[int]]) -> torch.fx.GraphModule:
    """Slim copy of ``analysis.gm`` keeping ``kept[group id]`` channels of each group."""
    keep = analysis.keep_mask(kept)
    old_gm = analysis.gm
    gm = copy.deepcopy(old_gm)
    _copy_meta(old_gm, gm)
    _slice_tensors(gm, analysis, keep)
    _update_modules(gm, old_gm)
    _patch_literals(gm, keep)
    gm.graph.lint()
    gm.recompile()
    return gm


def _copy_meta(src: torch.fx.GraphModule, dst: torch.fx.GraphModule) -> None:
    for a, b in zip(src.graph.nodes, dst.graph.nodes):
        b.meta[LABEL_KEY] = a.meta.get(LABEL_KEY)
        if "tensor_meta" in a.meta:
            b.meta["tensor_meta"] = a.meta["tensor_meta"]


def _owner(gm: nn.Module, target: str):
    prefix, _, name = target.rpartition(".")
    return (gm.get_submodule(prefix) if prefix else gm), name


def _slice_tensors(gm: torch.fx.GraphModule, analysis: Analysis, keep: np.ndarray) -> None:
    """Slice every recorded tensor dim down to the positions of kept ids."""
    by_target: Dict[str, list] = {}
    for rec in analysis.space.records.values():
        by_target.setdefault(rec.target, []).append(rec)
    replaced: Dict[int, torch.Tensor] = {}  # tied tensors stay tied: slice once, reuse
    for target, recs in by_target.items():
        module, name = _owner(gm, target)
        tensor = getattr(module, name)
        if id(tensor) in replaced:
            _assign(module, name, replaced[id(tensor)])
            continue
        new = tensor.detach()
        for rec in recs:
            positions = np.nonzero(keep[rec.ids])[0]
            if positions.size < rec.ids.size:
                new = new.index_select(rec.dim, torch.as_tensor(positions, device=new.device))
        if new.shape == tensor.shape:
            continue
        if isinstance(tensor, nn.Parameter):
            new = nn.Parameter(new.clone(), requires_grad=tensor.requires_grad)
        else:
            new = new.clone()
        replaced[id(tensor)] = new
        _assign(module, name, new)


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, tensor)
    else:
        module._buffers[name] = tensor


def _update_modules(gm: torch.fx.GraphModule, old_gm: torch.fx.GraphModule) -> None:
    """Make module attributes agree with their (sliced) tensors."""
    for name, mod in gm.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                            nn.ConvTranspose2d, nn.ConvTranspose3d)):
            _update_conv(mod, old_gm.get_submodule(name))
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            if ref is not None:
                mod.num_features = ref.shape[0]
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
            old = old_gm.get_submodule(name)
            per_group = old.num_channels // old.num_groups
            mod.num_channels = mod.weight.shape[0]
            if old.num_groups > 1:  # GroupNorm(1, C) stays one group (layer_rules.groupnorm_core)
                mod.num_groups = mod.num_channels // per_group
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        elif isinstance(mod, nn.PReLU):
            mod.num_parameters = mod.weight.numel()
        elif isinstance(mod, nn.RNNBase):  # input features only (recurrent_rules)
            mod.input_size = mod.weight_ih_l0.shape[1]


def _update_conv(mod: nn.Module, old: nn.Module) -> None:
    out_dim = 1 if mod.transposed else 0
    in_dim = 1 - out_dim
    if old.groups == 1:
        size = mod.weight.shape
        mod.out_channels, mod.in_channels = size[out_dim], size[in_dim]
        return
    # Grouped convs lose whole conv groups (see layer_rules.conv_core).
    out_per_group = old.out_channels // old.groups
    in_per_group = old.in_channels // old.groups
    new_out = mod.weight.shape[0] * (out_per_group if mod.transposed else 1)
    mod.groups = new_out // out_per_group
    mod.out_channels = new_out
    mod.in_channels = mod.groups * in_per_group


# --------------------------------------------------------------------------- literal args
def kept_size(label: Optional[TLabel], dim: int, size: int, keep: np.ndarray) -> int:
    """Size of ``dim`` after pruning, from its label (untracked indices stay)."""
    if label is None:
        return size
    if label.grid is not None and dim in label.grid.axes:
        ids = np.moveaxis(label.grid.ids, label.grid.axes.index(dim), 0).reshape(size, -1)
        alive = np.where(ids >= 0, keep[np.maximum(ids, 0)], True)
        # an index along a grid axis survives while any of its entries does: the head
        # axis loses whole heads, the q/k/v and head_dim axes keep their size
        return int(alive.any(axis=1).sum())
    ids = label.dims[dim]
    if ids is None:
        return size
    return int(np.where(ids >= 0, keep[np.maximum(ids, 0)], True).sum())


def _patch_literals(gm: torch.fx.GraphModule, keep: np.ndarray) -> None:
    for node in list(gm.graph.nodes):
        if node.op not in ("call_method", "call_function"):
            continue
        name, target = target_name(node), canonical(node.target)
        if name in ("view", "reshape", "expand", "broadcast_to"):
            _patch_shape_args(node, keep)
        elif name == "unflatten":
            _patch_unflatten(node, keep)
        elif name in ("split", "chunk", "split_with_sizes", "tensor_split"):
            _patch_split(gm, node, keep)
        elif target is F.layer_norm:
            _patch_layer_norm(node, keep)
        elif target is F.group_norm:
            _patch_group_norm(node, keep)
        elif target in (F.conv1d, F.conv2d, F.conv3d):
            _patch_conv_groups(node, keep)


def _patch_shape_args(node: torch.fx.Node, keep: np.ndarray) -> None:
    """Literal sizes become kept sizes; a size computed at run time that sizes a channel
    dim (read from another tensor's shape, which may be pruned differently) becomes -1
    where view/reshape can infer it, else its kept size (channel dims are static)."""
    label = node.meta.get(LABEL_KEY)
    shape = node.meta["tensor_meta"].shape
    args = list(node.args)
    packed = len(args) == 2 and isinstance(args[1], (list, tuple))
    sizes = list(args[1]) if packed else args[1:]
    name = target_name(node)
    can_infer = name in ("view", "reshape") and -1 not in [s for s in sizes if isinstance(s, int)]
    per_dim = len(sizes) == len(shape)  # not ``x.view(t.shape)`` (one node for all dims)
    for i, s in enumerate(sizes):
        if i >= len(shape) or (isinstance(s, int) and s == -1):
            continue
        if isinstance(s, int):
            sizes[i] = kept_size(label, i, int(shape[i]), keep)
        elif per_dim and isinstance(s, torch.fx.Node) and dim_ids(label, i) is not None:
            sizes[i] = -1 if can_infer else kept_size(label, i, int(shape[i]), keep)
            can_infer = False
    node.args = (args[0], tuple(sizes)) if packed else (args[0], *sizes)


def _patch_unflatten(node: torch.fx.Node, keep: np.ndarray) -> None:
    label = node.meta.get(LABEL_KEY)
    shape = node.meta["tensor_meta"].shape
    x, dim, sizes = node.args[0], node.args[1], list(node.args[2])
    in_nd = len(shape) - len(sizes) + 1
    dim %= in_nd
    for k, s in enumerate(sizes):
        if isinstance(s, int) and s != -1:
            sizes[k] = kept_size(label, dim + k, int(shape[dim + k]), keep)
    node.args = (x, dim, tuple(sizes))


def _patch_split(gm: torch.fx.GraphModule, node: torch.fx.Node, keep: np.ndarray) -> None:
    """Split sizes follow the kept channels of each piece; ``chunk`` becomes ``split``."""
    labels = node.meta.get(LABEL_KEY)
    metas = node.meta.get("tensor_meta")
    if not isinstance(labels, list) or not metas:
        return
    x = node.args[0]
    dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim_arg % len(metas[0].shape)
    new_sizes = [kept_size(lab, dim, int(m.shape[dim]), keep) for lab, m in zip(labels, metas)]
    old_sizes = [int(m.shape[dim]) for m in metas]
    if new_sizes == old_sizes:
        return
    node.op, node.target = "call_method", "split"
    node.args, node.kwargs = (x, new_sizes, dim), {}


def _patch_layer_norm(node: torch.fx.Node, keep: np.ndarray) -> None:
    x = node.args[0]
    shape = list(node.args[1])
    label, in_shape = x.meta.get(LABEL_KEY), x.meta["tensor_meta"].shape
    k = len(shape)
    new = [kept_size(label, len(in_shape) - k + i, int(in_shape[len(in_shape) - k + i]), keep)
           for i in range(k)]
    node.args = (x, tuple(new), *node.args[2:])


def _patch_group_norm(node: torch.fx.Node, keep: np.ndarray) -> None:
    x, groups = node.args[0], node.args[1]
    label, in_shape = x.meta.get(LABEL_KEY), x.meta["tensor_meta"].shape
    new_c = kept_size(label, 1, int(in_shape[1]), keep)
    if groups > 1:  # one group stays one group (layer_rules.groupnorm_core)
        node.args = (x, groups * new_c // int(in_shape[1]), *node.args[2:])


def _patch_conv_groups(node: torch.fx.Node, keep: np.ndarray) -> None:
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if groups == 1:
        return
    out_shape = node.meta["tensor_meta"].shape
    new_out = kept_size(node.meta.get(LABEL_KEY), 1, int(out_shape[1]), keep)
    new_groups = groups * new_out // int(out_shape[1])
    if len(node.args) > 6:
        node.args = (*node.args[:6], new_groups, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": new_groups}
