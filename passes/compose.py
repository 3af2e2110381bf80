"""Compose pass: a slim step's plan in the dense model's channel numbering.

The rewrite-based iterative mode (``compile(flops=[r1, r2, ...])``) re-traces and
re-analyses the slim model after every step, so each step's plan names the *slim*
analysis' groups and channels. The plan a user gets back (and applies to the dense
model with ``apply_plan``) must name the dense analysis' groups instead. Group ids do
not carry over one to one: re-analysing a slim model can split a dense group (a
layer whose outputs become partly blocked, e.g. one part of a ``split`` down to one
channel, forms a second group ``"<id>#2"``), so the mapping goes through the tensors.

Contract (:func:`compose_step`): reads the dense :class:`~.groups.Analysis`, the plan so
far in dense numbering, the slim step's analysis and its plan; returns the plan after
the step in dense numbering. A slim tensor dim holds the dense dim's kept positions in
order (what :func:`.rewrite.sliced_dims` slices), so every slim index removed by the
step maps to one dense index, and through the dense records to its group's channel.
Invariant: the returned plan keeps exactly the dense channels none of whose indices the
step removed; it names only dense groups (those of the plan so far, plus any that lose
channels). :func:`step_limits` maps the other way for selection: how many channels
each slim group may still lose under the dense groups' ``max_layer_sparsity`` caps, and
what ``round_to`` must add to a split part's width. Nothing is modified.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import FxpruneError
from .groups import Analysis

__all__ = ["compose_step", "step_limits"]


def compose_step(dense: Analysis, previous: Dict[str, List[int]], slim: Analysis,
                 kept: Dict[str, List[int]]) -> Dict[str, List[int]]:
    """``previous`` (dense numbering) followed by ``kept`` (the slim analysis'
    numbering), in dense numbering."""
    removed_ids = _removed_dense_ids(dense, dense.keep_mask(previous), slim,
                                     slim.keep_mask(kept))
    hit = removed_ids[dense.element_group[removed_ids] >= 0]
    removed: Dict[int, set] = {}
    for gi, channel in zip(dense.element_group[hit].tolist(), dense.element_channel[hit].tolist()):
        removed.setdefault(gi, set()).add(channel)
    out = {gid: sorted(chans) for gid, chans in previous.items()}
    for gi, channels in removed.items():
        group = dense.groups[gi]
        base = out.get(group.id, range(group.size))
        out[group.id] = sorted(set(base) - channels)
    return out


def _removed_dense_ids(dense: Analysis, dense_keep: np.ndarray, slim: Analysis,
                       slim_keep: np.ndarray) -> np.ndarray:
    """Dense atomic ids at the dense positions of every slim index the step removes.
    Raises when a removed slim channel has no tensor dim that maps back (a slim tensor
    the dense graph does not have): the plan could not name what the step removed."""
    found, mapped = [], np.zeros(slim.space.next_id, dtype=bool)
    for slim_ids, dense_ids in _paired_ids(dense, dense_keep, slim):
        gone = ~slim_keep[slim_ids]
        found.append(dense_ids[gone])
        mapped[slim_ids[gone]] = True
    _check_mapped(slim, slim_keep, mapped)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _paired_ids(dense: Analysis, dense_keep: np.ndarray, slim: Analysis):
    """``(slim ids, dense ids)`` of every tensor dim both analyses record: index j of the
    slim dim is the j-th dense index the plan so far keeps."""
    for key, rec in slim.space.records.items():
        dense_rec = dense.space.records.get(key)
        if dense_rec is None:
            continue
        positions = np.nonzero(dense_keep[dense_rec.ids])[0]
        if positions.size != rec.ids.size:
            raise FxpruneError(
                f"the slim model's {rec.target} (dim {rec.dim}) has {rec.ids.size} entries "
                f"where the plan so far keeps {positions.size}: the iterative steps cannot "
                "be composed into one plan; please report this model")
        yield rec.ids, dense_rec.ids[positions]


def step_limits(dense: Analysis, previous: Dict[str, List[int]], slim: Analysis,
                group_ids: List[str], max_layer_sparsity: float, round_to: int
                ) -> Tuple[Dict[str, int], Optional[Dict[str, int]]]:
    """Selection's limits for one iterative step on ``slim``, from which dense group each
    slim group in ``group_ids`` is cut (mapped once): ``(allowance, offsets)``, see
    :func:`_allowance` and :func:`_width_offsets` (offsets None when ``round_to`` is 1)."""
    parents, wanted = _parents(dense, previous, slim), _indices(slim, group_ids)
    allowance = _allowance(dense, previous, slim, parents, wanted, max_layer_sparsity)
    offsets = (_width_offsets(dense, previous, slim, parents, wanted) if round_to > 1
               else None)
    return allowance, offsets


def _allowance(dense: Analysis, previous: Dict[str, List[int]], slim: Analysis,
               parents: Dict[int, set], wanted: List[int], max_layer_sparsity: float
               ) -> Dict[str, int]:
    """How many more channels each slim group in ``wanted`` may lose so that no dense
    group loses more than ``floor(max_layer_sparsity * its size)`` in all: the dense
    group's allowance, shared equally by the slim groups cut from it (a slim group
    spanning several dense groups gets the smallest share)."""
    sharing: Dict[int, int] = {}
    for sg in wanted:
        for dg in parents.get(sg, ()):
            sharing[dg] = sharing.get(dg, 0) + 1
    out = {}
    for sg in wanted:
        shares = []
        for dg in parents.get(sg, ()):
            group = dense.groups[dg]
            lost = group.size - len(previous.get(group.id, range(group.size)))
            left = max(0, math.floor(max_layer_sparsity * group.size) - lost)
            shares.append(left // sharing[dg])
        out[slim.groups[sg].id] = min(shares) if shares else 0
    return out


def _width_offsets(dense: Analysis, previous: Dict[str, List[int]], slim: Analysis,
                   parents: Dict[int, set], wanted: List[int]) -> Dict[str, int]:
    """For ``round_to``: per slim group in ``wanted`` cut from one dense group, how many
    of that group's kept channels lie outside it (the part a split made a group of its
    own, blocked), so that rounding ``kept + offset`` keeps the *dense* group's width a
    multiple. Groups that are their dense group whole get no entry."""
    out = {}
    for sg in wanted:
        if len(parents.get(sg, ())) != 1:
            continue
        group = dense.groups[next(iter(parents[sg]))]
        offset = len(previous.get(group.id, range(group.size))) - slim.groups[sg].size
        if offset > 0:
            out[slim.groups[sg].id] = offset
    return out


def _parents(dense: Analysis, previous: Dict[str, List[int]], slim: Analysis
             ) -> Dict[int, set]:
    """Slim group index -> the dense group indices its channels come from."""
    parents: Dict[int, set] = {}
    for slim_ids, dense_ids in _paired_ids(dense, dense.keep_mask(previous), slim):
        pairs = np.stack([slim.element_group[slim_ids], dense.element_group[dense_ids]], 1)
        for sg, dg in np.unique(pairs[(pairs >= 0).all(1)], axis=0).tolist():
            parents.setdefault(sg, set()).add(dg)
    return parents


def _indices(slim: Analysis, group_ids: List[str]) -> List[int]:
    index = {g.id: i for i, g in enumerate(slim.groups)}
    return [index[gid] for gid in group_ids]


def _check_mapped(slim: Analysis, slim_keep: np.ndarray, mapped: np.ndarray) -> None:
    """Every removed channel of a slim group must reach at least one dense tensor."""
    ids = np.arange(slim.space.next_id)
    removed = (~slim_keep) & (slim.element_group >= 0)
    channel_mapped: Dict[tuple, bool] = {}
    for i, g, c in zip(ids[removed].tolist(), slim.element_group[removed].tolist(),
                       slim.element_channel[removed].tolist()):
        channel_mapped[(g, c)] = channel_mapped.get((g, c), False) or bool(mapped[i])
    lost = [f"{slim.groups[g].id}[{c}]" for (g, c), ok in channel_mapped.items() if not ok]
    if lost:
        raise FxpruneError(f"channels {', '.join(lost[:4])} of the slim model map to no tensor "
                           "of the dense model: the iterative steps cannot be composed into "
                           "one plan; please report this model")
