"""Kept channels for every removal prefix of a global order (selection's inner loop).

Contract: :class:`PrefixPlans` reads the groups selection may prune, their removal caps,
their ``round_to`` steps (:mod:`.widths`) and a removal order (``[(group id, channel)]``,
least important first); :meth:`PrefixPlans.kept` answers, for a prefix length ``k``,
``{group id: sorted kept channels}``: each group's *accepted* channels among the first
``k`` entries -- first occurrences whose removal leaves every member span a channel
(:class:`SpanGuard`) -- their count capped and rounded by
:func:`~.widths.rounded_removal` (rounding up takes the group's next accepted channels in
order), removed in order. This is the plan that :func:`~.select.select_budget` bisects
on; the per-group work is done once, not per bisection step:

* a group's decisions do not depend on other groups, and the guard decides each channel
  from the channels before it only, so a group's accepted channels are computed once
  for the whole order (the guard walks only the groups that have member spans), and
  a prefix's share is how many of them lie within it;
* the cap and the rounding count removed channels, not entries: a refused or repeated
  entry would otherwise use up the cap, or leave a width off the ``round_to`` step;
* each group's share of a prefix comes from cumulative counts (``numpy``), and kept
  lists are cached by how many accepted channels they drop.

Invariants (those of the span guard and of :mod:`.widths`): every member span keeps a
channel; a group loses at most its cap; a channel listed twice counts once; a group
that loses channels keeps a multiple of its step (or stays whole).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..group import Group, member_spans
from .widths import rounded_removal

__all__ = ["SpanGuard", "spans_of", "PrefixPlans"]


def spans_of(group: Group) -> List[frozenset]:
    """:func:`~fxprune.group.member_spans`, answered without a walk over every channel
    when every member covers every channel (no spans: the common case)."""
    if all(len(m.index_map) == group.size and all(m.index_map) for m in group.members):
        return []
    return member_spans(group)


class SpanGuard:
    """Tracks removals so that no member span of a group loses its last channel."""

    def __init__(self, groups):
        self.full: Dict[str, List[int]] = {}
        self.of_channel: Dict[str, Dict[int, List[int]]] = {}
        for g in groups:
            spans = spans_of(g)
            if not spans:
                continue
            self.full[g.id] = [len(s) for s in spans]
            index: Dict[int, List[int]] = {}
            for k, span in enumerate(spans):
                for c in span:
                    index.setdefault(c, []).append(k)
            self.of_channel[g.id] = index
        self.reset()

    def reset(self) -> "SpanGuard":
        """Forget all recorded removals."""
        self.left = {gid: list(n) for gid, n in self.full.items()}
        return self

    def remove(self, gid: str, c: int) -> bool:
        """Record removing channel ``c`` of ``gid`` unless it would empty a span."""
        ks = self.of_channel.get(gid, {}).get(c, ())
        if any(self.left[gid][k] <= 1 for k in ks):
            return False
        for k in ks:
            self.left[gid][k] -= 1
        return True


def _accepted(guard: SpanGuard, gid: str, size: int, channels: np.ndarray
              ) -> Tuple[np.ndarray, np.ndarray]:
    """(positions, channels) of the entries of one group's removal sequence that are
    removed when the whole sequence is walked: first occurrences the guard accepts."""
    if gid not in guard.full:  # no member spans: every first occurrence goes
        _, first = np.unique(channels, return_index=True)
        pos = np.sort(first)
    else:
        seen, keep = set(), []
        for i, c in enumerate(channels.tolist()):
            if c not in seen:
                seen.add(c)
                if guard.remove(gid, c):
                    keep.append(i)
        pos = np.asarray(keep, dtype=np.int64)
    ch = channels[pos]
    inside = (ch >= 0) & (ch < size)  # a channel outside the group removes nothing
    return pos[inside], ch[inside]


class PrefixPlans:
    """Kept channels per group for any prefix of ``order`` (see the module doc)."""

    def __init__(self, groups: Sequence[Group], caps: Dict[str, int], steps: Dict[str, int],
                 order: Sequence[Tuple[str, int]] = (), arrays=None,
                 base: Optional[Dict[str, int]] = None,
                 offsets: Optional[Dict[str, int]] = None):
        """``order`` as ``[(group id, channel)]``, or ``arrays`` = (group ids, group index
        per entry, channel per entry), the same order without the tuples. ``base``
        (gradual steps): per group, how many of its first entries earlier steps removed;
        a share beyond them is rounded as the slim model of those steps would round it,
        so that ``round_to`` keeps the multiples the rewrite-based iterative mode keeps.
        ``offsets``: per group, kept channels outside it that the rounded width counts
        (a split part's dense group, :func:`~.compose.step_limits`)."""
        self.ids = [g.id for g in groups]
        self.sizes = [g.size for g in groups]
        self.steps = [steps[gid] for gid in self.ids]
        self.base = [(base or {}).get(gid, 0) for gid in self.ids]
        self.offsets = [(offsets or {}).get(gid, 0) for gid in self.ids]
        where = {gid: i for i, gid in enumerate(self.ids)}
        if arrays is None:
            self.of_entry = np.fromiter((where[gid] for gid, _ in order), dtype=np.int64,
                                        count=len(order))
            channels = np.fromiter((c for _, c in order), dtype=np.int64, count=len(order))
        else:
            ids, entry_group, channels = arrays
            remap = np.asarray([where[gid] for gid in ids], dtype=np.int64)
            self.of_entry = remap[entry_group] if len(ids) else entry_group
        self.entries: List[np.ndarray] = []  # per group: its entries' places in the order
        guard = SpanGuard(groups)
        self.pos: List[np.ndarray] = []
        self.ch: List[np.ndarray] = []
        self.caps: List[int] = []
        for i, gid in enumerate(self.ids):
            self.entries.append(np.flatnonzero(self.of_entry == i))
            mine = channels[self.entries[i]]
            self.caps.append(caps[gid])
            pos, ch = _accepted(guard, gid, self.sizes[i], mine)
            self.pos.append(pos)
            self.ch.append(ch)
        self._lists: Dict[Tuple[int, int], List[int]] = {}

    def __len__(self) -> int:
        return len(self.of_entry)

    def key(self, k: int) -> Tuple[int, ...]:
        """How many accepted channels each group drops for the prefix ``order[:k]``:
        equal keys are equal plans."""
        wanted = np.bincount(self.of_entry[:k], minlength=len(self.ids)).tolist()
        out = []
        for i, n in enumerate(self.sizes):
            b, w = self.base[i], wanted[i]
            # counts of removed channels, not of entries: the span guard refuses some
            # entries and an entry may repeat, so a cap or a rounded width counted in
            # entries would remove fewer channels than it allows (a width off the step)
            done, upto = np.searchsorted(self.pos[i], [b, w]).tolist()  # accepted before
            if w <= b:
                out.append(upto)
                continue
            cap = min(self.caps[i], len(self.pos[i]))
            out.append(done + rounded_removal(n + self.offsets[i] - done, upto - done,
                                              max(0, cap - done), self.steps[i]))
        return tuple(out)

    def removed(self, key: Tuple[int, ...]) -> Dict[str, Tuple[List[int], List[int]]]:
        """``{group id: (removed channels, their places in the order)}`` for a
        :meth:`key`, in removal order (what :func:`~.fill.give_back` walks back)."""
        return {gid: (self.ch[i][:m].tolist(), self.entries[i][self.pos[i][:m]].tolist())
                for i, (gid, m) in enumerate(zip(self.ids, key))}

    def kept(self, key: Tuple[int, ...]) -> Dict[str, List[int]]:
        """``{group id: sorted kept channels}`` for a :meth:`key`; fresh lists."""
        return {gid: list(self._kept_list(i, m))
                for i, (gid, m) in enumerate(zip(self.ids, key))}

    def _kept_list(self, i: int, m: int) -> List[int]:
        out = self._lists.get((i, m))
        if out is None:
            mask = np.ones(self.sizes[i], dtype=bool)
            mask[self.ch[i][:m]] = False
            out = self._lists[(i, m)] = np.flatnonzero(mask).tolist()
        return out
