"""SOSP structures: the parameters *into* one channel of one group (design §5.3).

A structure ``s`` is channel ``c`` of a prunable group: the slices of the group's members
whose role is ``producer`` (output rows of a layer), ``bias`` or ``norm`` (BN/LN affine
entries; buffers such as running statistics carry no score). ``θ_s`` is θ on those slices
and 0 elsewhere; ``θ_struc = Σ_s θ_s``.

:class:`StructureIndex` stores, for every parameter that owns structure entries, the
sliced dim and a label vector along it (structure number per index, ``-1`` outside
every structure) -- O(channels) memory, not O(parameters). From it come ``θ_struc``,
batched tangents ``θ_s`` for forward-mode AD, and segment sums ``Σ_{i∈s} v_i`` of
per-parameter tensors.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import CriterionError
from ..group import Group
from .perturb import CONSUMER_ROLES

log = logging.getLogger(__name__)

#: Member roles whose slices make up a structure (the parameters into a channel).
STRUCTURE_ROLES = ("producer", "bias", "norm")


class StructureIndex:
    """Structures of ``groups`` over ``params`` (``{qualified name: tensor}``).

    Contract: ``ids[k] = (group id, channel)`` of structure ``k``. A structure member
    slices its parameter along one dim, so each indexed parameter has one ``axis`` and a
    1-D int64 ``labels`` vector along it (structure number, or -1 for an index outside
    every structure): :meth:`owner` broadcasts it to the parameter's shape. ``overlap``
    is True when an index is claimed by two structures (the first keeps it, so
    ``Σ_s θ_s ≠ θ_struc``; :meth:`mask` is the union). Only groups with
    ``prunable=True`` are indexed unless ``prunable_only=False``. ``roles`` picks the
    member slices that form a structure (default :data:`STRUCTURE_ROLES`; the consumer
    cut uses the consumer columns) and ``sign`` multiplies every ``θ_s`` (-1 for the
    consumer cut, whose δθ removes θ). Raises :class:`CriterionError` if one parameter
    is sliced along two different dims.
    """

    def __init__(self, groups: Iterable[Group], params: Dict[str, Tensor], *,
                 prunable_only: bool = True, roles: Sequence[str] = STRUCTURE_ROLES,
                 sign: float = 1.0):
        self.roles, self.sign = tuple(roles), float(sign)
        self.ids: List[Tuple[str, int]] = []
        self.axis: Dict[str, int] = {}
        self.labels: Dict[str, Tensor] = {}
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.overlap = False
        lists: Dict[str, List[int]] = {}
        for g in groups:
            if prunable_only and not g.prunable:
                continue
            base = len(self.ids)
            self.ids.extend((g.id, c) for c in range(g.size))
            for m in g.members:
                if m.role in self.roles and m.target in params:
                    self._claim(lists, m.target, params[m.target], m.dim, m.index_map, base)
        for n, lab in lists.items():
            self.labels[n] = torch.tensor(lab, dtype=torch.long, device=params[n].device)
        self._names = [n for n, lab in lists.items() if max(lab) >= 0]

    def _claim(self, lists: Dict[str, List[int]], name: str, p: Tensor, dim: int,
               index_map: Sequence[Sequence[int]], base: int) -> None:
        dim = dim % max(1, p.dim())
        if name not in lists:
            self.axis[name] = dim
            lists[name] = [-1] * (p.shape[dim] if p.dim() else 1)
        elif self.axis[name] != dim:
            raise CriterionError(
                f"{name} is sliced by structures along dims {self.axis[name]} and {dim}; "
                "SOSP structures need one sliced dim per parameter (use another criterion)")
        lab = lists[name]
        for c, idx in enumerate(index_map):
            for i in idx:
                if lab[i] < 0:
                    lab[i] = base + c
                elif lab[i] != base + c:
                    self.overlap = True

    @property
    def size(self) -> int:
        """Number of structures S."""
        return len(self.ids)

    @property
    def names(self) -> List[str]:
        """Parameters that own at least one structure entry (deterministic order)."""
        return list(self._names)

    def _along(self, name: str, vec: Tensor) -> Tensor:
        """A vector along the parameter's axis, shaped to broadcast against it."""
        shape = [1] * len(self.shapes[name])
        if shape:
            shape[self.axis[name]] = -1
        return vec.reshape(shape)

    def owner(self, name: str) -> Tensor:
        """Structure number of every entry of ``name`` (-1 outside), its full shape."""
        return self._along(name, self.labels[name]).expand(self.shapes[name])

    def mask(self, name: str) -> Tensor:
        return self._along(name, self.labels[name] >= 0)

    def touches(self, name: str, sids: Tensor) -> bool:
        """Whether any structure of ``sids`` owns an entry of ``name``."""
        return bool(torch.isin(self.labels[name], sids).any())

    def theta_struc(self, params: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``{name: sign · θ ⊙ mask}`` for the parameters that own structure entries."""
        return {n: self.sign * params[n].detach() * self.mask(n).to(params[n].dtype)
                for n in self.names}

    def tangents(self, params: Dict[str, Tensor], sids: Tensor,
                 names: Optional[Sequence[str]] = None) -> Tuple[Tensor, ...]:
        """For structures ``sids`` (1-D int64), one tensor per name of ``names`` (default
        :attr:`names`), shaped ``[len(sids), *param.shape]``: row k is
        ``sign · θ_{sids[k]}`` on that parameter."""
        out = []
        for n in (self.names if names is None else names):
            p = params[n].detach()
            sel = self._along(n, self.labels[n]).unsqueeze(0) == sids.view(-1, *([1] * p.dim()))
            out.append(self.sign * p.unsqueeze(0) * sel.to(p.dtype))
        return tuple(out)

    def segment_sum(self, values: Dict[str, Tensor], lead: int = 0) -> Tensor:
        """``out[..., s] = Σ_{i ∈ s} values[name][..., i]`` over all indexed parameters.

        ``values[name]`` has ``lead`` leading batch dims followed by the parameter's
        shape; missing names contribute zero. Returns ``[*lead_shape, S]`` (float64).
        """
        out: Optional[Tensor] = None
        for n in self._names:
            if n not in values:
                continue
            v = values[n].detach()
            ax = lead + self.axis[n]
            if len(self.shapes[n]) == 0:
                along = v.reshape(*v.shape[:lead], 1)
            else:
                other = [d for d in range(lead, v.dim()) if d != ax]
                along = v.sum(other) if other else v        # [*lead, shape[axis]]
            along = along.to(torch.float64)
            if out is None:
                out = torch.zeros(*v.shape[:lead], self.size + 1, dtype=torch.float64,
                                  device=v.device)
            # index -1 goes to a spill bin S that is dropped
            bins = torch.where(self.labels[n] < 0, self.size, self.labels[n])
            out.index_add_(lead, bins, along)
        if out is None:
            return torch.zeros(self.size, dtype=torch.float64)
        return out[..., :self.size]


def structure_index(groups: Iterable[Group], params: Dict[str, Tensor],
                    perturb: str = "weights") -> StructureIndex:
    """The SOSP structures of option ``perturb`` (:mod:`.perturb`): θ on the producer/
    bias/norm slices (``"weights"``) or -θ on the consumer slices (``"consumer"``)."""
    if perturb == "consumer":
        return StructureIndex(groups, params, roles=CONSUMER_ROLES, sign=-1.0)
    return StructureIndex(groups, params)


def kernel_sizes(groups: Iterable[Group], params: Dict[str, Tensor]) -> Dict[str, float]:
    """Per group: the kernel size of its producers (``k_h·k_w`` for a 2-D conv, the
    product of the spatial dims in general, 1 for a Linear). A group with several
    producers (a residual stream fed by a 3×3 and a 1×1 conv) gets their mean; a group
    without a producer parameter gets 1."""
    out = {}
    for g in groups:
        sizes = [math.prod(params[m.target].shape[2:]) if params[m.target].dim() > 2 else 1
                 for m in g.members if m.role == "producer" and m.target in params]
        out[g.id] = float(sum(sizes)) / len(sizes) if sizes else 1.0
    return out
