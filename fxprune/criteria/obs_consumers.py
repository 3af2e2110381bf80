"""Which layers ``criterion="obs"`` measures, and on which statistics (issue 12).

Contract: reads a scoring module and its groups; returns every Linear / Conv1d / Conv2d
that consumes a prunable channel, with its units (one per input channel: the weight
slices and design columns it owns), and a reason for every consumer member it cannot
measure (grouped convs, weights sliced on another dim, layers too wide for a ``d x d``
Gram). Option ``gram`` decides which convs are scored on factored statistics
(:mod:`fxprune.passes.kron_gram`), which also decides which are too wide. Writes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..passes.kron_gram import kron_supported
from ..passes.lstsq import REFIT_TYPES
from ..passes.obs_solve import consumer_columns

__all__ = ["GRAMS", "KRON_MIN_UNKNOWNS", "MAX_UNKNOWNS", "factored_layers", "find_consumers"]

#: Largest input patch (+ bias) measured: ``H`` is ``d²`` float64 (2 GiB at 16384).
MAX_UNKNOWNS = 16384
#: Values of option ``gram``: which input statistics a conv consumer is scored on.
GRAMS = {"auto": "the exact Gram, factored (\"kron\") for convs with at least "
                 "KRON_MIN_UNKNOWNS inputs (default)",
         "exact": "every consumer's exact input Gram (d x d for d inputs)",
         "kron": "every conv with a kernel larger than 1x1 on its channel x kernel factored "
                 "Gram (fxprune.passes.kron_gram; a c x c problem)"}
#: ``gram="auto"`` factors a conv's Gram from this many inputs (channels x kernel) on.
#: An exact layer costs about ``d³`` twice over: its Gram (up to ``ROWS_PER_UNKNOWN · d``
#: rows of ``d²`` per batch) and its inverse and greedy. On resnet50 (4 batches of 8)
#: the exact Grams of its 3x3 convs in layer2-4 (1 152 - 4 608 inputs) made obs cost
#: 3.8 gradient passes per batch, factored 1.6 (layer4's solves alone ≈ 22 s exact,
#: 1 s factored; ``benchmarks/RESULTS.md``). Below 1 024 (every conv of the quality
#: benchmark's ResNet-20, at most 576) the exact Gram costs little and is kept.
KRON_MIN_UNKNOWNS = 1024
@dataclass
class _Unit:
    """One prunable input channel of a consumer layer."""

    group: str
    channel: int
    indices: List[int]     # along dim 1 of the weight
    cols: Tensor           # columns of the layer's design rows


@dataclass
class _Consumer:
    name: str
    layer: nn.Module
    units: List[_Unit] = field(default_factory=list)


def _unsupported(target: str, dim: int, mods: Dict[str, nn.Module],
                 gram: str = "auto") -> Optional[str]:
    """Why the consumer member ``(target, dim)`` cannot be measured with option ``gram``,
    or None."""
    name, _, leaf = target.rpartition(".")
    layer = mods.get(name)
    if leaf != "weight" or not isinstance(layer, REFIT_TYPES):
        return "not the weight of a Linear / Conv1d / Conv2d module"
    if dim != 1:
        return f"sliced along dim {dim}, not the input dim 1"
    if getattr(layer, "groups", 1) != 1:
        return "a grouped conv (pruned in whole conv groups, outputs included)"
    # a factored conv's problem is channels x channels: its kernel does not count
    unknowns = layer.weight.shape[1] if _factored(layer, gram) else layer.weight[0].numel()
    if unknowns + 1 > MAX_UNKNOWNS:
        return f"{unknowns} inputs (more than {MAX_UNKNOWNS - 1})"
    return None


def find_consumers(module: nn.Module, groups, gram: str = "auto"
                   ) -> Tuple[Dict[str, _Consumer], Dict[str, str]]:
    """``({layer name: consumer with its prunable units}, {skipped target: reason})`` for
    option ``gram`` (:data:`GRAMS`: which layers are too wide depends on it)."""
    mods = dict(module.named_modules())
    consumers: Dict[str, _Consumer] = {}
    skipped: Dict[str, str] = {}
    for g in groups:
        if not g.prunable:
            continue
        for m in g.members:
            if m.role != "consumer":
                continue
            reason = _unsupported(m.target, m.dim, mods, gram)
            if reason is not None:
                skipped[m.target] = reason
                continue
            name = m.target.rpartition(".")[0]
            cons = consumers.setdefault(name, _Consumer(name, mods[name]))
            for c, idx in enumerate(m.index_map):
                if idx:
                    cons.units.append(_Unit(g.id, c, list(idx),
                                            consumer_columns(cons.layer, idx)))
    return consumers, skipped


def factored_layers(consumers: Dict[str, "_Consumer"], gram: str) -> List[str]:
    """The consumers option ``gram`` (:data:`GRAMS`) scores on factored statistics."""
    return [name for name, c in consumers.items() if _factored(c.layer, gram)]


def _factored(layer: nn.Module, gram: str) -> bool:
    """Whether option ``gram`` scores ``layer`` on its factored Gram."""
    least = {"exact": None, "kron": 0, "auto": KRON_MIN_UNKNOWNS}[gram]
    return least is not None and kron_supported(layer) and layer.weight[0].numel() >= least
