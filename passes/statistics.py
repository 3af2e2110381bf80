"""Statistics over channels that pruning may shrink: ``mean(dim, keepdim=True)``.

Llama's RMSNorm (``x.pow(2).mean(-1, keepdim=True)``) and hand-written LayerNorms reduce
over the channel dim to a per-position statistic that is broadcast back. Pruning that dim
makes the slim model take the statistic over the kept channels, as a LayerNorm over a
pruned stream does (design §7). The channel rule (``reduce_rule`` in
:mod:`.tensor_rules`) therefore lets such a mean through instead of blocking its
channels, and the masked reference (:mod:`.verify`) replaces it by :func:`masked_mean`,
so that the two compute the same thing.

Contract: :func:`statistic_mean_args` reads one node (its target, arguments and input's
``tensor_meta``); :func:`masked_mean` is a pure tensor function.
"""
from __future__ import annotations

import torch
import torch.fx

from .rule_table import canonical

__all__ = ["masked_mean", "statistic_mean_args"]


def masked_mean(x, dims, keep):
    """``x.mean(dims, keepdim=True)`` over the kept entries only (a statistic over a
    pruned dim: Llama's RMSNorm ``x.pow(2).mean(-1, keepdim=True)``, a hand-written
    LayerNorm), which is what the slim model's mean over its fewer channels computes."""
    keep = keep.to(x.dtype)
    count = (keep * torch.ones_like(x)).sum(dims, keepdim=True)
    return (x * keep).sum(dims, keepdim=True) / count


torch.fx.wrap("masked_mean")


def statistic_mean_args(node: torch.fx.Node):
    """``(input node, reduced dims)`` of a ``mean`` with ``keepdim=True`` (method, torch
    function or ATen overload), else None."""
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and canonical(node.target) in (torch.mean, "mean"))
    if not is_mean or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    get = lambda i, n, d=None: node.args[i] if len(node.args) > i else node.kwargs.get(n, d)
    x, dim = node.args[0], get(1, "dim")
    shape = getattr(x.meta.get("tensor_meta"), "shape", None)
    if get(2, "keepdim", False) is not True or shape is None or dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return x, tuple(sorted(d % len(shape) for d in dims))
