"""The analysis result: coupled-channel groups.

A :class:`Group` is the set of parameter/buffer slices that must lose the same
channels together. Channel ``c`` of a group owns, for every :class:`Member`, the
indices ``member.index_map[c]`` along ``member.dim`` of the tensor named
``member.target``. Zeroing all of those slices removes the channel's effect.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class Member:
    """One tensor dimension that belongs to a group.

    ``target``: qualified name of a parameter or buffer (``layer1.0.conv1.weight``).
    ``dim``: the sliced dimension. ``index_map[c]``: indices along ``dim`` owned by
    channel ``c`` (one for a plain channel, ``head_dim`` rows per q/k/v for a head,
    ``H*W`` columns for a flatten→Linear consumer).
    ``role``: ``"producer"`` (output rows of a layer), ``"consumer"`` (input columns),
    ``"norm"``/``"bias"``/``"tensor"`` (everything that merely carries the channel).
    ``roles``: every role the dim plays, ``("producer", "consumer")`` for a weight that
    one layer produces with and a tied, transposed use consumes with (an embedding that
    is also the LM head); ``role`` is the first of them.
    """

    target: str
    dim: int
    index_map: List[List[int]]
    role: str = "tensor"
    roles: Tuple[str, ...] = ()
    # where a target that the user's model does not have comes from: tracing stores a
    # tensor computed without a Proxy as ``_tensor_constantN`` (the buffer it is, or is a
    # view of; passes/trace.name_constants). None for the model's own tensors.
    source: Optional[str] = None

    def __post_init__(self):
        self.roles = tuple(self.roles) or (self.role,)

    @property
    def role_text(self) -> str:
        """``role``, or ``"producer+consumer"`` for a dim playing both."""
        return "+".join(self.roles)

    def to_dict(self) -> dict:
        return {"target": self.target, "dim": self.dim, "role": self.role,
                "roles": list(self.roles), "source": self.source,
                "index_map": [list(map(int, ix)) for ix in self.index_map]}


@dataclass
class Group:
    """A coupled-channel group; see the module docstring."""

    id: str
    size: int
    members: List[Member] = field(default_factory=list)
    divisor: int = 1
    prunable: bool = True
    reason: Optional[str] = None
    kind: str = "channel"  # "channel", "head", "conv-group", "stream"

    def member(self, target: str, dim: Optional[int] = None) -> Member:
        for m in self.members:
            if m.target == target and (dim is None or m.dim == dim):
                return m
        raise KeyError(f"{target} (dim {dim}) is not a member of group {self.id}")

    @property
    def targets(self) -> List[str]:
        return [m.target for m in self.members]

    def to_dict(self) -> dict:
        return {"id": self.id, "size": self.size, "divisor": self.divisor,
                "prunable": self.prunable, "reason": self.reason, "kind": self.kind,
                "members": [m.to_dict() for m in self.members]}

    def __str__(self) -> str:
        status = "prunable" if self.prunable else f"NOT prunable: {self.reason}"
        lines = [f"Group {self.id}  size={self.size} kind={self.kind} "
                 f"divisor={self.divisor}  {status}",
                 f"  {'target':<48} {'dim':>3} {'role':<17} {'idx/ch':>6}"]
        for m in self.members:
            per = len(m.index_map[0]) if m.index_map else 0
            lines.append(f"  {m.target:<48} {m.dim:>3} {m.role_text:<17} {per:>6}")
            if m.source:
                lines.append(f"    ^ {m.target} is {m.source}")
        return "\n".join(lines)


def groups_table(groups: List[Group]) -> str:
    """A one-line-per-group summary table."""
    rows = [f"{'group':<40} {'size':>6} {'kind':<10} {'members':>7}  status"]
    for g in groups:
        status = "prunable" if g.prunable else f"fixed: {g.reason}"
        rows.append(f"{g.id:<40} {g.size:>6} {g.kind:<10} {len(g.members):>7}  {status}")
    return "\n".join(rows)


def groups_by_id(groups: List[Group]) -> Dict[str, Group]:
    return {g.id: g for g in groups}


def member_spans(group: Group) -> List[frozenset]:
    """Channel subsets of which at least one channel must stay: for every member whose
    ``index_map`` covers only some of the group's channels (one layer of a merged
    concat, one split piece read by a conv), the channels it covers."""
    spans = set()
    for m in group.members:
        covered = frozenset(c for c, ix in enumerate(m.index_map) if ix)
        if covered and len(covered) < group.size:
            spans.add(covered)
    return sorted(spans, key=sorted)
