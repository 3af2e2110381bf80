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
channels). Nothing is modified.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from ..errors import FxpruneError
from .groups import Analysis

__all__ = ["compose_step"]


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
    for key, rec in slim.space.records.items():
        gone = np.nonzero(~slim_keep[rec.ids])[0]
        dense_rec = dense.space.records.get(key)
        if gone.size == 0 or dense_rec is None:
            continue
        positions = np.nonzero(dense_keep[dense_rec.ids])[0]
        if positions.size != rec.ids.size:
            raise FxpruneError(
                f"the slim model's {rec.target} (dim {rec.dim}) has {rec.ids.size} entries "
                f"where the plan so far keeps {positions.size}: the iterative steps cannot "
                "be composed into one plan; please report this model")
        found.append(dense_rec.ids[positions[gone]])
        mapped[rec.ids[gone]] = True
    _check_mapped(slim, slim_keep, mapped)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


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
