"""Latency-table pass: measured per-layer latency as a function of kept width (the
``latency=r`` budget of :mod:`.budget`).

Contract: :func:`measure_table` reads an analysed graph (:class:`~.groups.Analysis`,
``tensor_meta`` on its nodes) and the example inputs, and returns a
:class:`LatencyTable`; it changes no module, tensor or graph. It times, on the device
and in the dtype of each layer's weight (the user's device), every Conv / Linear module
whose channels a prunable group can change, at ``points`` kept widths from one unit to
full (a conv-group for grouped convs), on random inputs of the traced input shape
(channel dim narrowed), under ``torch.no_grad``: one warm-up pass per width, then
``rounds`` rounds that time every width (the order alternates between rounds, so a
load spike hits all widths) with the median of ``repeats`` passes each (fewer for slow
layers: at most ``point_budget_ms`` per width and round). The whole dense graph is timed
the same way; what the layers do not account for is the table's fixed part
(normalisation, activations, pooling, additions, attention products: all costed at
their dense time, a conservative prediction). A layer whose rounds disagree by more than
:data:`NOISY_SPREAD` is marked noisy; a table with many noisy layers is
:attr:`~LatencyTable.unreliable` (a loaded machine) and the report says so.

Costing (:meth:`LatencyTable.cost`, which ``CostModel.latency`` calls): a layer's width
under a keep mask is the geometric mean of the kept fractions of the dims a prunable
group can change (its output channels and, for an ungrouped layer, its input channels),
the width it was timed at on both dims - exact when both dims keep the same fraction,
the same FLOPs otherwise. Its latency is the piecewise-linear interpolation of its
timings at that width (made non-decreasing in width by isotonic regression, so that a
bigger mask never costs less and selection's bisection stays exact). The mask's cost
is the fixed part plus the sum over layers; the dense cost is the cost of the all-kept
mask. Invariant: ``cost`` is monotone in the mask and ``cost(all kept) == dense_ms``.

Timing goes through ``timer(module, inputs) -> ms`` (default :func:`wall_timer`,
looked up at call time), so tests inject a deterministic one.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx
from torch import nn

from .groups import LABEL_KEY, Analysis
from .labels import TLabel
from .layer_rules import LAYER_MODULES

__all__ = ["LayerCurve", "LatencyTable", "measure_table", "wall_timer", "isotonic"]

log = logging.getLogger(__name__)

Timer = Callable[[nn.Module, Tuple[Any, ...]], float]  # ms of one forward pass

#: A layer whose round medians at one width differ by more than this fraction of their
#: median is noisy; when more than a quarter of the layers are, the table is unreliable.
NOISY_SPREAD = 0.5


@dataclass
class LayerCurve:
    """One layer's latency (ms) at increasing kept widths (fractions in (0, 1])."""

    name: str                       # module qualified name
    arrays: List[np.ndarray]        # atomic ids of the dims its width follows
    widths: np.ndarray              # increasing, last == 1.0
    times_ms: np.ndarray            # non-decreasing
    noisy: bool = False             # its timing rounds disagreed by more than NOISY_SPREAD

    def width(self, keep: np.ndarray) -> float:
        """Geometric mean of the kept fractions of :attr:`arrays` under ``keep``."""
        log_sum = 0.0
        for ids in self.arrays:
            alive = np.where(ids >= 0, keep[np.maximum(ids, 0)], True)
            log_sum += math.log(max(float(alive.mean()), 1e-12))
        return math.exp(log_sum / len(self.arrays))

    def at(self, width: float) -> float:
        """Piecewise-linear interpolation (clamped to the first and last point)."""
        return float(np.interp(width, self.widths, self.times_ms))


@dataclass
class LatencyTable:
    """Per-layer curves plus the fixed part: the predicted latency of a keep mask."""

    layers: List[LayerCurve] = field(default_factory=list)
    fixed_ms: float = 0.0
    measured_dense_ms: float = 0.0   # the whole dense graph, timed
    device: str = "cpu"

    @property
    def unreliable(self) -> bool:
        """More than a quarter of the layers timed noisily (other load on the machine)."""
        return sum(c.noisy for c in self.layers) > len(self.layers) / 4

    def cost(self, keep: np.ndarray) -> float:
        """Predicted latency (ms) of the model under the keep mask ``keep``."""
        return self.fixed_ms + sum(c.at(c.width(keep)) for c in self.layers)

    @property
    def dense_ms(self) -> float:
        """Predicted latency with every channel kept."""
        return self.fixed_ms + sum(float(c.times_ms[-1]) for c in self.layers)


def wall_timer(module: nn.Module, inputs: Tuple[Any, ...]) -> float:
    """Wall-clock milliseconds of one ``module(*inputs)`` (CUDA synchronised)."""
    cuda = any(torch.is_tensor(x) and x.is_cuda for x in inputs)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    module(*inputs)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def isotonic(values: Sequence[float]) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent
    violators): timing noise must not make a wider layer cheaper."""
    blocks: List[List[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, n in blocks])


def measure_table(analysis: Analysis, inputs: Tuple[Any, ...], *, points: int = 5,
                  rounds: int = 3, max_repeats: int = 5, point_budget_ms: float = 20.0,
                  max_seconds: float = 60.0, timer: Optional[Timer] = None) -> LatencyTable:
    """Time every prunable Conv/Linear layer of ``analysis`` at ``points`` kept widths
    and the whole dense graph on ``inputs`` (see the module docstring). Layers reached
    after ``max_seconds`` (a loaded machine) are timed once per width."""
    timer = timer or wall_timer
    gm = analysis.gm
    prunable = _prunable_ids(analysis)
    layers = [spec for spec in (_layer_spec(gm, n, prunable) for n in gm.graph.nodes)
              if spec is not None]
    device = _device_of(gm)
    log.info("latency table: timing %d prunable layers at %d widths each on %s", len(layers),
             points, device)
    start = time.perf_counter()
    table = LatencyTable(device=str(device))
    with torch.no_grad():
        late = False
        for i, spec in enumerate(layers):
            if not late and time.perf_counter() - start > max_seconds:
                late = True
                log.info("latency table: past %.0f s (a loaded machine?): the %d layers left "
                         "are timed once per width", max_seconds, len(layers) - i)
            curve = _time_layer(spec, points, 1 if late else rounds,
                                1 if late else max_repeats, point_budget_ms, timer)
            if curve is not None:
                table.layers.append(curve)
            if (i + 1) % 20 == 0:
                log.info("latency table: %d/%d layers timed", i + 1, len(layers))
        real = tuple(x.to(device) if torch.is_tensor(x) else x for x in inputs)
        table.measured_dense_ms = _median_time(gm, real, rounds, max_repeats,
                                               point_budget_ms * 5, timer)
    in_layers = sum(float(c.times_ms[-1]) for c in table.layers)
    table.fixed_ms = max(0.0, table.measured_dense_ms - in_layers)
    if in_layers > table.measured_dense_ms:
        log.info("latency table: the layers timed alone (%.3f ms) exceed the whole graph "
                 "(%.3f ms); no fixed part", in_layers, table.measured_dense_ms)
    log.info("latency table: dense %.3f ms (%.3f ms in %d layers, %.3f ms fixed), "
             "measured in %.1f s", table.dense_ms, in_layers, len(table.layers),
             table.fixed_ms, time.perf_counter() - start)
    if table.unreliable:
        log.warning("latency table: the timing rounds of %d of %d layers disagree by more "
                    "than %d%% (other load on the machine?): the latency budget's "
                    "prediction is unreliable", sum(c.noisy for c in table.layers),
                    len(table.layers), int(NOISY_SPREAD * 100))
    return table


def _prunable_ids(analysis: Analysis) -> np.ndarray:
    """Per atomic id: does a prunable group own it?"""
    flags = np.array([g.prunable for g in analysis.groups] + [False], dtype=bool)
    return flags[analysis.element_group]  # element_group -1 -> the trailing False


@dataclass
class _Spec:
    """A layer to time: its module, traced input shape and the dims that can shrink."""

    name: str
    module: nn.Module
    in_shape: Tuple[int, ...]
    axis: int                       # channel axis of input and output
    out_ids: Optional[np.ndarray]   # output channel ids, when prunable
    in_ids: Optional[np.ndarray]    # input channel ids, when prunable (ungrouped only)


def _layer_spec(gm: torch.fx.GraphModule, node: torch.fx.Node,
                prunable: np.ndarray) -> Optional[_Spec]:
    """The layer a ``call_module`` node of a Conv/Linear runs, if a prunable group can
    change its width and it has one tensor input with a recorded shape."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    mod = gm.get_submodule(node.target)
    x = node.args[0]
    meta = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
    if not isinstance(mod, LAYER_MODULES) or meta is None or not hasattr(meta, "shape"):
        return None
    axis = -1 if isinstance(mod, nn.Linear) else 1
    out_ids = _variable(node.meta.get(LABEL_KEY), axis, prunable)
    grouped = getattr(mod, "groups", 1) != 1
    in_ids = None if grouped else _variable(x.meta.get(LABEL_KEY), axis, prunable)
    if out_ids is None and in_ids is None:
        return None
    return _Spec(str(node.target), mod, tuple(meta.shape), axis, out_ids, in_ids)


def _variable(label: Any, axis: int, prunable: np.ndarray) -> Optional[np.ndarray]:
    """The ids of ``label``'s dim ``axis`` when a prunable group owns one of them."""
    if not isinstance(label, TLabel) or label.grid is not None or not label.dims:
        return None
    ids = label.dims[axis]
    if ids is None or not (ids >= 0).any() or not prunable[ids[ids >= 0]].any():
        return None
    return ids


def _time_layer(spec: _Spec, points: int, rounds: int, max_repeats: int, budget_ms: float,
                timer: Timer) -> Optional[LayerCurve]:
    """The layer's curve: each width timed interleaved; ``None`` (fixed part) when a
    narrowed copy does not run (a subclass with more width-dependent tensors)."""
    try:
        variants = _variants(spec, points)
        warm = [timer(m, x) for _, m, x in variants]  # warm-up, and the repeat estimate
    except (RuntimeError, ValueError, TypeError) as exc:
        log.debug("latency table: %s timed at its dense time only (%s)", spec.name, exc)
        return None
    repeats = max(1, min(max_repeats, int(budget_ms / max(warm[-1], 1e-3))))
    per: List[List[float]] = [[] for _ in variants]
    for r in range(rounds):
        order = range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))
        for k in order:
            _, m, x = variants[k]
            per[k].append(statistics.median(timer(m, x) for _ in range(repeats)))
    medians = [statistics.median(p) for p in per]
    noisy = any(max(p) - min(p) > NOISY_SPREAD * m for p, m in zip(per, medians))
    times = isotonic(medians)
    widths = np.array([w for w, _, _ in variants])
    log.debug("latency table: %s widths %s ms %s%s", spec.name, np.round(widths, 3),
              np.round(times, 4), " (noisy)" if noisy else "")
    arrays = [a for a in (spec.out_ids, spec.in_ids) if a is not None]
    return LayerCurve(spec.name, arrays, widths, times, noisy)


def _variants(spec: _Spec, points: int) -> List[Tuple[float, nn.Module, tuple]]:
    """(realised width, narrowed module, random input) per distinct width, ascending."""
    mod = spec.module
    units = _units(mod, spec)
    seen, out = set(), []
    for f in np.linspace(0.0, 1.0, max(points, 2)):
        n = {dim: max(1, int(round(f * size))) for dim, size in units.items()}
        key = tuple(sorted(n.items()))
        if key in seen:
            continue
        seen.add(key)
        fractions = [n[d] / units[d] for d in units]
        width = math.exp(sum(map(math.log, fractions)) / len(fractions))
        out.append((width, *_narrowed(spec, n)))
    return out


def _units(mod: nn.Module, spec: _Spec) -> dict:
    """The unit counts that shrink with width: ``{"out": C, "in": C}`` (ungrouped) or
    ``{"groups": G}`` (grouped convs lose whole conv groups)."""
    groups = getattr(mod, "groups", 1)
    if groups != 1:
        return {"groups": groups}
    units = {}
    if spec.out_ids is not None:
        units["out"] = _out_features(mod)
    if spec.in_ids is not None:
        units["in"] = _in_features(mod)
    return units


def _out_features(mod: nn.Module) -> int:
    return mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels


def _in_features(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def _narrowed(spec: _Spec, n: dict) -> Tuple[nn.Module, tuple]:
    """A copy of the layer with ``n`` units (sharing nothing it changes) and an input."""
    mod = spec.module
    groups = getattr(mod, "groups", 1)
    if groups != 1:
        g = n["groups"]
        out_n, in_n = _out_features(mod) // groups * g, _in_features(mod) // groups * g
    else:
        out_n, in_n = n.get("out", _out_features(mod)), n.get("in", _in_features(mod))
        g = 1
    shape = list(spec.in_shape)
    shape[spec.axis] = in_n
    w = mod.weight
    x = torch.randn(shape, device=w.device, dtype=w.dtype)
    if (out_n, in_n) == (_out_features(mod), _in_features(mod)):
        return mod, (x,)
    new = copy.copy(mod)
    new._parameters = dict(mod._parameters)
    if isinstance(mod, nn.Linear):
        weight = w[:out_n, :in_n]
        new.in_features, new.out_features = in_n, out_n
    else:
        transposed = getattr(mod, "transposed", False)
        weight = w[:in_n, :out_n // g] if transposed else w[:out_n, :in_n // g]
        new.in_channels, new.out_channels, new.groups = in_n, out_n, g
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if getattr(mod, "bias", None) is not None:
        new.bias = nn.Parameter(mod.bias.detach()[:out_n].clone(), requires_grad=False)
    return new, (x,)


def _median_time(module: nn.Module, inputs: tuple, rounds: int, max_repeats: int,
                 budget_ms: float, timer: Timer) -> float:
    """Median over ``rounds`` of the median of up to ``max_repeats`` passes."""
    first = timer(module, inputs)  # warm-up
    repeats = max(1, min(max_repeats, int(budget_ms / max(first, 1e-3))))
    return statistics.median(statistics.median(timer(module, inputs) for _ in range(repeats))
                             for _ in range(rounds))


def _device_of(gm: nn.Module) -> torch.device:
    """The device of the graph's first parameter (cpu when it has none)."""
    for p in gm.parameters():
        return p.device
    return torch.device("cpu")
