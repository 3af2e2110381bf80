"""Carry pass: write a slim model's tensors back into the dense shapes (the rewrite's inverse).

Gradual pruning scores a *masked* dense-shaped copy at every step (:mod:`.gradual`). When
the steps should see the plan so far as the repair pass would leave it (BN statistics
re-estimated, layers re-fitted: ``Gradual(repair=...)``), the repair runs on the
rewritten slim model and this pass writes the result into the masked copy.

Contract (:func:`carry_tensors`): reads the dense :class:`~.groups.Analysis` (its
records: which tensor dims were sliced to which kept positions), the plan, and the slim
model the rewrite made of that plan; writes every parameter and buffer of the slim model
into the same-named tensor of ``target`` (a dense-shaped copy of the analysed graph, e.g.
:func:`.verify.masked_reference`) at the kept positions. Removed positions keep what
``target`` held there (the masked reference's zeros). Invariant: when ``slim`` is
``rewrite(dense, kept)`` unchanged, ``target`` computes what the masked reference
computes; after a repair of ``slim``, what the repaired slim model computes. The dense
analysis and ``slim`` are not changed.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import FxpruneError
from .groups import Analysis, fetch_attr
from .rewrite import sliced_dims

__all__ = ["carry_tensors"]

Dims = List[Tuple[int, torch.Tensor]]


def carry_tensors(dense: Analysis, slim: nn.Module, kept: Dict[str, List[int]],
                  target: nn.Module) -> None:
    """Write ``slim``'s tensors into ``target`` at the kept positions (module doc)."""
    sliced = _sliced_dims(dense, dense.keep_mask(kept))
    with torch.no_grad():
        for name, src in _named_tensors(slim):
            try:
                dst = fetch_attr(target, name)
            except AttributeError:
                raise FxpruneError(f"carrying the slim model back: {name!r} has no dense-"
                                   "shaped counterpart (a rewrite bug; please report)") from None
            if dst is None:  # e.g. running statistics dropped for batch-statistics BN
                continue
            _write(dst, sliced.get(name, []), src.detach(), name)


def _named_tensors(module: nn.Module):
    return itertools.chain(module.named_parameters(remove_duplicate=False),
                           module.named_buffers(remove_duplicate=False))


def _sliced_dims(dense: Analysis, keep: np.ndarray) -> Dict[str, Dims]:
    """``{name: [(dim, kept positions), ...]}`` for every name (aliases included) of a
    tensor the rewrite slices (:func:`.rewrite.sliced_dims`; a tied tensor is sliced as
    its first target says, as the rewrite slices it)."""
    by_tensor: Dict[int, Dims] = {}
    for target, dims in sliced_dims(dense, keep).items():
        tensor = fetch_attr(dense.gm, target)
        by_tensor.setdefault(id(tensor), [(d, torch.as_tensor(p, device=tensor.device))
                                          for d, p in dims])
    return {name: by_tensor[id(t)] for name, t in _named_tensors(dense.gm)
            if id(t) in by_tensor}


def _write(dst: torch.Tensor, dims: Dims, src: torch.Tensor, name: str) -> None:
    """``dst`` restricted to ``dims``' positions := ``src``, one sliced dim at a time (a
    block is gathered, filled along the remaining dims and scattered back)."""
    if not dims:
        if dst.shape != src.shape:
            raise FxpruneError(f"carrying the slim model back: {name!r} has shape "
                               f"{tuple(src.shape)}, its dense slice {tuple(dst.shape)} (a "
                               "rewrite bug; please report)")
        dst.copy_(src)
        return
    (dim, positions), rest = dims[0], dims[1:]
    block = dst.index_select(dim, positions)
    _write(block, rest, src, name)
    dst.index_copy_(dim, positions, block)
