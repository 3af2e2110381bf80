"""Front end: ``torch.export`` capture with a dynamic batch (and sequence) dimension.

Contract: :func:`export_dynamic` reads a module and example inputs (a tuple of
positional inputs, optionally a dict of keyword inputs) and returns a
``torch.export.ExportedProgram`` whose batch dimension (dim 0 of every tensor input) is a
symbol, and whose sequence dimension (dim 1 of integer inputs of rank 2: token ids,
attention masks) is one too. It never mutates the module (export runs it on fake tensors)
nor the inputs. Both the ``.pt2`` writer (``fxprune prune --export``) and the export front
end (:mod:`.export_frontend`) capture through it, so the two agree on which dims are free.

Why inputs are widened: export specialises every dimension whose example size is 0 or 1
(``Guard failed: x.size()[0] == 1``), so a batch-1 example would give a batch-1 program.
A dim of size 1 that is meant to be free is therefore exported from a copy of the input
repeated to size 2 along it; the program computes the same function at every size.

Bounds: the sequence dim is exported as ``Dim.DYNAMIC``, so a model may bound it without
failing the capture: BERT slices its ``position_ids`` buffer of
``max_position_embeddings`` entries, so its program takes ``1 <= seq <= 512`` (longer
inputs fail the program's guard, as they fail the model). ``DynamicCapture.max_size``
holds each free dim's bound (``None``: unbounded), and the log says it.

Fallbacks, and why: a model may really fix a dimension (a position embedding added to
the full sequence, a ``view(3)`` of a batch-1 input). Export then fails (a constraint
violation, or the widened input does not fit); the sequence dim is made static first,
then the batch dim, and a warning names what stays fixed and why. A model that cannot be
exported at all raises :class:`~fxprune.errors.TraceError`.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..errors import TraceError

__all__ = ["export_dynamic", "free_dims", "DynamicCapture"]

log = logging.getLogger(__name__)

BATCH, SEQ = "batch", "seq"


class DynamicCapture:
    """An exported program, the dims left free in it (``{"batch", "seq"}`` subset) and,
    per free dim, the largest size the program takes (``max_size``; ``None``: no bound)."""

    def __init__(self, program, free: Tuple[str, ...]):
        self.program, self.free = program, free
        self.max_size = {kind: _upper_bound(program, kind) for kind in free}


def free_dims(value: Any, kinds: Sequence[str]) -> Dict[int, str]:
    """``{dim: kind}`` that are free for one input: dim 0 of a tensor (batch), dim 1 of
    an integer tensor of rank 2 (sequence of token ids or mask entries)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return {}
    out: Dict[int, str] = {}
    if BATCH in kinds:
        out[0] = BATCH
    discrete = not (value.is_floating_point() or value.is_complex())  # ids, masks
    if SEQ in kinds and value.dim() == 2 and discrete:
        out[1] = SEQ
    return out


def _widen(value: Any, dims: Dict[int, str]) -> Any:
    """Repeat a size-1 free dim to size 2 (see the module docstring)."""
    for d in dims:
        if value.shape[d] == 1:
            value = torch.cat([value, value], dim=d)
    return value


def export_dynamic(module: torch.nn.Module, args: Tuple[Any, ...],
                   kwargs: Optional[Dict[str, Any]] = None, *,
                   kinds: Sequence[str] = (BATCH, SEQ)) -> DynamicCapture:
    """Export ``module`` with the dims in ``kinds`` free (module docstring); fall back
    to fewer free dims when the model fixes one, and say so."""
    kwargs = dict(kwargs or {})
    tried = [tuple(kinds)]
    if SEQ in kinds:
        tried.append(tuple(k for k in kinds if k != SEQ))
    tried.append(())
    last: Optional[BaseException] = None
    for free in tried:
        try:
            program = _export(module, args, kwargs, free)
        except Exception as exc:  # noqa: BLE001 - retried with fewer free dims, then raised
            if free:
                last = exc
                continue
            raise TraceError(f"torch.export could not capture {type(module).__name__}: "
                             f"{type(exc).__name__}: {_first_line(exc)}. Make the forward "
                             "exportable (torch.export's error above names the line), or "
                             "use the FX front end (frontend='fx')") from exc
        capture = DynamicCapture(program, free)
        _note_bounds(module, capture)
        if free != tried[0]:
            fixed = sorted(set(tried[0]) - set(free))
            log.warning("%s: the exported program fixes the %s dimension(s) to the example "
                        "input's size (%s)", type(module).__name__, "/".join(fixed),
                        _first_line(last))
        return capture
    raise AssertionError("unreachable: the static attempt either returns or raises")


def _export(module, args, kwargs, free):
    if not free:
        return torch.export.export(module, tuple(args), kwargs or None)
    wide_args, wide_kwargs, dyn = _build_spec(module, args, kwargs, free)
    return torch.export.export(module, wide_args, wide_kwargs or None, dynamic_shapes=dyn)


def _build_spec(module, args, kwargs, free):
    """Widened inputs and the ``dynamic_shapes`` argument. Without keyword inputs it is
    a tuple parallel to ``args``; with them, a dict keyed by the forward's parameter
    names (what torch.export expects when kwargs are given)."""
    from torch.export import Dim
    # the sequence dim is Dim.DYNAMIC: export may bound it (a position table of N rows:
    # 1 <= seq <= N) instead of failing, but still refuses to specialise it to a constant
    # (a torch before Dim.DYNAMIC: a named Dim, so a bound falls back to a fixed length)
    symbols = {BATCH: Dim("batch", min=1), SEQ: getattr(Dim, "DYNAMIC", None) or Dim("seq", min=1)}

    def one(value):
        dims = free_dims(value, free)
        if not dims:
            return value, None
        return _widen(value, dims), {d: symbols[k] for d, k in dims.items()}

    pos = [one(a) for a in args]
    kw = {k: one(v) for k, v in kwargs.items()}
    wide_args = tuple(p[0] for p in pos)
    wide_kwargs = {k: p[0] for k, p in kw.items()}
    if not kwargs:
        return wide_args, wide_kwargs, tuple(p[1] for p in pos)
    names = [n for n in inspect.signature(module.forward).parameters][:len(args)]
    dyn = {n: p[1] for n, p in zip(names, pos)}
    dyn.update({k: p[1] for k, p in kw.items()})
    return wide_args, wide_kwargs, dyn


def _upper_bound(program, kind: str) -> Optional[int]:
    """The largest size of the ``kind`` dims of the program's inputs that its range
    constraints allow (``None`` when unbounded)."""
    ranges = program.range_constraints
    bounds = []
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(value, torch.Tensor) or node.name not in _user_inputs(program):
            continue
        for d, k in free_dims(value, (kind,)).items():
            size = value.shape[d]
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            upper = ranges[expr].upper if expr in ranges else None
            if getattr(upper, "is_Integer", False):  # not int_oo (no bound)
                bounds.append(int(upper))
    return min(bounds) if bounds else None


def _user_inputs(program) -> set:
    return set(program.graph_signature.user_inputs)


def _note_bounds(module, capture: DynamicCapture) -> None:
    for kind, upper in capture.max_size.items():
        if upper is not None:
            log.info("%s: the exported program takes a %s dimension of at most %d (the "
                     "model bounds it, e.g. by its number of position embeddings)",
                     type(module).__name__, kind, upper)


def _first_line(exc: Optional[BaseException]) -> str:
    text = str(exc or "").strip()
    return text.splitlines()[0] if text else type(exc).__name__
