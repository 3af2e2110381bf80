"""Per-op rewrite facts (design §7): module resizing and literal patching, as tables.

:data:`RESIZE` maps a module type (looked up along the MRO) to ``resize(mod, old)``,
which makes the sliced module's size attributes (``in_channels``, ``groups``,
``normalized_shape``, ...) agree with its sliced tensors; ``old`` is the dense module.
:data:`PATCH` maps a function / method to ``patch(gm, node, keep)``, which rewrites the
literal arguments traced into the graph (sizes of ``view``/``reshape``, ``split`` sizes,
norm shapes, conv ``groups``) to the kept sizes. Both are :class:`~.rule_table.RuleTable`
s keyed like the channel rules, so that supporting an op is entries in tables: its
channel rule (:data:`.rule_table.RULES`), its rewrite here, its FLOPs' contracted dim
(:data:`.count.CONTRACTED`).

Reads: the labels (``node.meta["fxprune_label"]``) and shapes of the analysed graph and
the keep mask over atomic ids. Writes: module attributes and node arguments of the
slim copy only. Invariant: every size these entries write is the kept size of the
labelled dim it sizes (untracked dims keep theirs).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .groups import LABEL_KEY
from .labels import TLabel, dim_ids
from .rule_table import RuleTable, target_name

__all__ = ["RESIZE", "PATCH", "kept_size"]

RESIZE = RuleTable("module resize")
PATCH = RuleTable("literal patch")


# --------------------------------------------------------------------------- module sizes
@RESIZE.module(nn.modules.conv._ConvNd)
def _resize_conv(mod: nn.Module, old: nn.Module) -> None:
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


@RESIZE.module(nn.Linear)
def _resize_linear(mod: nn.Module, old: nn.Module) -> None:
    mod.out_features, mod.in_features = mod.weight.shape


@RESIZE.module(nn.modules.batchnorm._NormBase)  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
def _resize_channel_norm(mod: nn.Module, old: nn.Module) -> None:
    ref = mod.weight if mod.weight is not None else mod.running_mean
    if ref is not None:
        mod.num_features = ref.shape[0]


@RESIZE.module(nn.LayerNorm)
def _resize_layer_norm(mod: nn.Module, old: nn.Module) -> None:
    if mod.weight is not None:
        mod.normalized_shape = tuple(mod.weight.shape)


@RESIZE.module(nn.GroupNorm)
def _resize_group_norm(mod: nn.Module, old: nn.Module) -> None:
    if mod.weight is None:
        return
    per_group = old.num_channels // old.num_groups
    mod.num_channels = mod.weight.shape[0]
    if old.num_groups > 1:  # GroupNorm(1, C) stays one group (layer_rules.groupnorm_core)
        mod.num_groups = mod.num_channels // per_group


@RESIZE.module(nn.Embedding)
def _resize_embedding(mod: nn.Module, old: nn.Module) -> None:
    mod.num_embeddings, mod.embedding_dim = mod.weight.shape


@RESIZE.module(nn.PReLU)
def _resize_prelu(mod: nn.Module, old: nn.Module) -> None:
    mod.num_parameters = mod.weight.numel()


@RESIZE.module(nn.RNNBase)  # input features only (recurrent_rules)
def _resize_recurrent(mod: nn.Module, old: nn.Module) -> None:
    mod.input_size = mod.weight_ih_l0.shape[1]


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


@PATCH.method("view", "reshape", "expand", "broadcast_to")
@PATCH.function(torch.reshape, torch.broadcast_to)
def _patch_shape_args(gm, node: torch.fx.Node, keep: np.ndarray) -> None:
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


@PATCH.method("unflatten")
@PATCH.function(torch.unflatten)
def _patch_unflatten(gm, node: torch.fx.Node, keep: np.ndarray) -> None:
    label = node.meta.get(LABEL_KEY)
    shape = node.meta["tensor_meta"].shape
    x, dim, sizes = node.args[0], node.args[1], list(node.args[2])
    in_nd = len(shape) - len(sizes) + 1
    dim %= in_nd
    for k, s in enumerate(sizes):
        if isinstance(s, int) and s != -1:
            sizes[k] = kept_size(label, dim + k, int(shape[dim + k]), keep)
    node.args = (x, dim, tuple(sizes))


@PATCH.method("split", "chunk", "split_with_sizes", "tensor_split")
@PATCH.function(torch.split, torch.chunk, torch.tensor_split)
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


@PATCH.function(F.layer_norm)
def _patch_layer_norm(gm, node: torch.fx.Node, keep: np.ndarray) -> None:
    x = node.args[0]
    shape = list(node.args[1])
    label, in_shape = x.meta.get(LABEL_KEY), x.meta["tensor_meta"].shape
    k = len(shape)
    new = [kept_size(label, len(in_shape) - k + i, int(in_shape[len(in_shape) - k + i]), keep)
           for i in range(k)]
    node.args = (x, tuple(new), *node.args[2:])


@PATCH.function(F.group_norm)
def _patch_group_norm(gm, node: torch.fx.Node, keep: np.ndarray) -> None:
    x, groups = node.args[0], node.args[1]
    label, in_shape = x.meta.get(LABEL_KEY), x.meta["tensor_meta"].shape
    new_c = kept_size(label, 1, int(in_shape[1]), keep)
    if groups > 1:  # one group stays one group (layer_rules.groupnorm_core)
        node.args = (x, groups * new_c // int(in_shape[1]), *node.args[2:])


@PATCH.function(F.conv1d, F.conv2d, F.conv3d)
def _patch_conv_groups(gm, node: torch.fx.Node, keep: np.ndarray) -> None:
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
