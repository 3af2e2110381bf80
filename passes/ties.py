"""Tie check of the analysis pass (design §3): tensors reachable under several names.

Reads: an :class:`~fxprune.passes.groups.Analysis` (its GraphModule's parameters and
buffers by every name, and the channel records of each name). Writes: ``prunable`` /
``reason`` of the groups a tied tensor touches when the analysis does not couple its
uses. Invariant: after it, no plan over prunable groups slices one tensor differently
under two names.
"""
from __future__ import annotations

import logging
from typing import Dict, List

__all__ = ["refuse_broken_ties"]

log = logging.getLogger(__name__)


def refuse_broken_ties(analysis):
    """Tied tensors (one parameter or buffer reachable under several names) must lose
    the same slices under every name. Where the analysis does not tie them (it keys
    tensors by name), the groups they touch are marked unprunable with the reason,
    so they are never pruned inconsistently. Returns ``analysis``."""
    gm = analysis.gm
    slots: Dict[int, List[tuple]] = {}
    for kind in ("named_parameters", "named_buffers"):
        for name, t in getattr(gm, kind)(remove_duplicate=False):
            prefix, _, attr = name.rpartition(".")
            owner = gm.get_submodule(prefix) if prefix else gm
            slots.setdefault(id(t), []).append((name, id(owner), attr))
    records: Dict[str, list] = {}
    for (target, _dim), rec in analysis.space.records.items():
        records.setdefault(target, []).append(rec)
    for aliases in slots.values():
        if len({(owner, attr) for _, owner, attr in aliases}) < 2:
            continue  # one module slot reached by several paths: sliced once, still tied
        names = sorted({name for name, _, _ in aliases})
        if _ties_consistent(analysis, [records.get(n, []) for n in names]):
            continue
        touched = set()
        for n in names:
            for rec in records.get(n, []):
                gids = analysis.element_group[rec.ids]
                touched.update(int(g) for g in gids[gids >= 0])
        reason = (f"`{names[0]}` is tied to `{names[1]}` (one tensor under several names) "
                  "and the analysis does not couple the two uses; tied tensors are kept whole")
        for gi in sorted(touched):
            group = analysis.groups[gi]
            if group.prunable:
                group.prunable, group.reason = False, reason
                log.info("group %s: %s", group.id, reason)
    return analysis


def _ties_consistent(analysis, recs_per_name) -> bool:
    """Do all aliases the graph reads carry the same records, channel for channel? An
    alias with no records is never read by the graph (both uses go through one name):
    the rewrite points it at the slice (``rewrite._own_the_rest``)."""
    def signature(recs):
        return sorted((r.dim, tuple(analysis.element_group[r.ids].tolist()),
                       tuple(analysis.element_channel[r.ids].tolist())) for r in recs)
    read = [signature(r) for r in recs_per_name if r]
    return all(sig == read[0] for sig in read[1:])
