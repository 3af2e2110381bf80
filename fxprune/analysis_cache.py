"""One analysis per (model, example input shapes) for the public analysis API.

Contract: :func:`cached_analysis` returns the :class:`~fxprune.passes.groups.Analysis` of
``model`` on inputs shaped like ``example_inputs``, tracing and analysing only when no
entry matches; :func:`cached_connectivity` the :class:`Connectivity` of the same traced
graph. ``fxprune.groups(m, x)`` followed by ``fxprune.connectivity(m, x)`` therefore
traces once, and calling either again on an unchanged model traces not at all (issue 17).

An entry is keyed on the model object's identity (a weak reference: the entry goes when
the model does) and is valid while a cheap :func:`fingerprint` of the model is equal:
every module's qualified name, object identity, class, the functions its class and
base classes define (a patched ``forward`` or helper method) and training flag; every
parameter's and buffer's name, identity, shape, dtype, device and ``requires_grad``;
every other attribute in a module's ``__dict__`` (scalars by value, containers by
identity and length, anything else by identity); the example inputs' structure, shapes,
dtypes and devices (not their values); the trace options; and the generation of the
registries (a channel rule or leaf type registered since makes a new analysis).
Replacing a submodule, resizing or re-assigning a weight, ``model.half()`` /
``.to(device)``, ``train()`` / ``eval()`` or setting a flag such as ``fused_attn`` all
change the fingerprint. Weight *values* are not in it: the analysis never reads them. Not in it either: the
module-level functions a ``forward`` calls (patching one of those needs :func:`clear`
or ``cache=False``).

The model is never mutated (tracing works on a twin, :mod:`fxprune.passes.trace`). The
cached results are never handed out: callers get copies (:func:`copy_groups`,
:func:`copy_connectivity`), so editing a returned group cannot change a later call's.
At most :data:`MAX_ENTRIES` models are remembered (least recently used goes first);
:func:`clear` forgets them all.
"""
from __future__ import annotations

import copy
import dataclasses
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from torch.utils import _pytree as pytree

from .group import Group
from .passes.connectivity import Connectivity, build_connectivity
from .passes.frontend import capture
from .passes.groups import Analysis, analyze
from .passes.trace import gc_paused
from .registry import generation

__all__ = ["cached_analysis", "cached_connectivity", "fingerprint", "copy_groups",
           "copy_connectivity", "clear", "MAX_ENTRIES"]

#: How many models the cache remembers (each entry holds a traced GraphModule that
#: shares the model's tensors, and its analysis).
MAX_ENTRIES = 4

_SCALARS = (bool, int, float, str, type(None))
_SKIP = frozenset({"_parameters", "_buffers", "_modules", "training"})
_EXACT_SCALARS = frozenset(_SCALARS)
_EXACT_CONTAINERS = frozenset({dict, list, set, OrderedDict})  # (subclasses: the slow path)


@dataclasses.dataclass
class _Entry:
    key: tuple
    gm: torch.fx.GraphModule
    analysis: Optional[Analysis] = None
    connectivity: Optional[Connectivity] = None


# model (weakly) -> entry; an OrderedDict of ids gives the LRU order
_ENTRIES: "weakref.WeakKeyDictionary[torch.nn.Module, _Entry]" = weakref.WeakKeyDictionary()
_ORDER: "OrderedDict[int, weakref.ref]" = OrderedDict()


def clear() -> None:
    """Forget every cached analysis."""
    _ENTRIES.clear()
    _ORDER.clear()


def cached_analysis(model: torch.nn.Module, example_inputs: Any, trace_kwargs: Dict[str, Any]
                    ) -> Analysis:
    """The analysis of ``model`` (module docstring); the caller must not modify it."""
    entry = _entry(model, example_inputs, trace_kwargs)
    if entry is None:  # not cacheable (e.g. tensors in concrete_args)
        return analyze(capture(model, example_inputs, **trace_kwargs))
    if entry.analysis is None:
        entry.analysis = analyze(entry.gm)
    return entry.analysis


def cached_connectivity(model: torch.nn.Module, example_inputs: Any,
                        trace_kwargs: Dict[str, Any]) -> Connectivity:
    """The connectivity table of ``model``'s traced graph; the caller must not modify it."""
    entry = _entry(model, example_inputs, trace_kwargs)
    if entry is None:
        return build_connectivity(capture(model, example_inputs, **trace_kwargs))
    if entry.connectivity is None:
        entry.connectivity = build_connectivity(entry.gm)
    return entry.connectivity


def _entry(model, example_inputs, trace_kwargs) -> Optional[_Entry]:
    """The valid entry of ``model``, made (traced) when missing or stale; None when the
    call cannot be keyed (it is then traced by the caller, uncached)."""
    key = _key(model, example_inputs, trace_kwargs)
    if key is None:
        return None
    try:
        entry = _ENTRIES.get(model)
    except TypeError:  # a model that cannot be weakly referenced: no cache
        return None
    if entry is None or entry.key != key:
        entry = _Entry(key, capture(model, example_inputs, **trace_kwargs))
        _ENTRIES[model] = entry
    _touch(model)
    return entry


def _touch(model: torch.nn.Module) -> None:
    """Mark ``model`` as most recently used; evict beyond :data:`MAX_ENTRIES`."""
    _ORDER.pop(id(model), None)
    _ORDER[id(model)] = weakref.ref(model)
    while len(_ORDER) > MAX_ENTRIES:
        _, ref = _ORDER.popitem(last=False)
        old = ref()
        if old is not None:
            _ENTRIES.pop(old, None)


def _key(model, example_inputs, trace_kwargs) -> Optional[tuple]:
    inputs = _input_spec(example_inputs)
    options = _options_spec(trace_kwargs)
    if inputs is None or options is None:
        return None
    return (fingerprint(model), inputs, options, generation())


def fingerprint(model: torch.nn.Module) -> tuple:
    """What the analysis of ``model`` depends on, short of tensor values (module
    docstring). Two equal fingerprints of one model object give equal analyses.

    Built with the cyclic garbage collector paused: its ~10^4 small tuples would
    otherwise trigger collections that walk the whole heap (3-4x the fingerprint's own
    time next to a timm model); it makes no cycles."""
    with gc_paused():
        return _fingerprint(model)


def _fingerprint(model: torch.nn.Module) -> tuple:
    parts: List[tuple] = []
    methods: Dict[type, tuple] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        attrs = [(k, _value_spec(v)) for k, v in mod.__dict__.items() if k not in _SKIP]
        kind = type(mod)
        if kind not in methods:
            methods[kind] = _methods_spec(kind)
        parts.append((name, id(mod), kind, methods[kind], mod.training,
                      tuple(attrs),
                      _tensors_spec(mod._parameters), _tensors_spec(mod._buffers),
                      tuple((k, id(c)) for k, c in mod._modules.items())))
    return tuple(parts)


def _methods_spec(kind: type) -> tuple:
    """Identity of every function defined by ``kind`` and its bases below ``nn.Module``
    (a class whose ``forward`` or helper method was patched gets a new spec)."""
    out = []
    for cls in kind.__mro__:
        if cls is torch.nn.Module or cls is object:
            break
        out.extend((cls.__qualname__, k, id(v)) for k, v in vars(cls).items()
                   if callable(v) or isinstance(v, (staticmethod, classmethod, property)))
    return tuple(out)


def _tensors_spec(tensors: Dict[str, Optional[torch.Tensor]]) -> tuple:
    return tuple((k, None) if t is None else
                 (k, id(t), t.shape, t.dtype, t.device, t.requires_grad)
                 for k, t in tensors.items())


def _value_spec(v: Any) -> Any:
    """A comparable stand-in for a module attribute: scalars (and tuples of them) by
    value, tensors by identity and shape, containers by identity and length, anything
    else by identity."""
    kind = type(v)  # exact types first: most attributes are hook dicts and flags
    if kind in _EXACT_CONTAINERS:
        return (kind, id(v), len(v))
    if kind in _EXACT_SCALARS or isinstance(v, _SCALARS):
        return v
    if isinstance(v, tuple) and all(isinstance(x, _SCALARS) for x in v):
        return v
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v.shape, v.dtype, v.device)
    if isinstance(v, (dict, list, set)):
        return (type(v), id(v), len(v))
    return ("object", id(v))


def _input_spec(example_inputs: Any) -> Optional[tuple]:
    """Structure, shapes, dtypes and devices of the inputs; None if a leaf is neither a
    tensor nor a scalar."""
    leaves, spec = pytree.tree_flatten(example_inputs)
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            out.append((type(x), x.shape, x.dtype, x.device, x.requires_grad))
        elif isinstance(x, _SCALARS):
            out.append((type(x), x))
        else:
            return None
    return (str(spec), tuple(out))


def _options_spec(trace_kwargs: Dict[str, Any]) -> Optional[tuple]:
    """The trace options as a comparable tuple; None when one cannot be compared
    safely (a tensor or an object in ``concrete_args``)."""
    out = []
    for k in sorted(trace_kwargs):
        v = trace_kwargs[k]
        if k == "leaf_modules":
            v = tuple(v)
            if not all(isinstance(m, (type, str)) for m in v):
                return None
        elif k == "concrete_args" and v is not None:
            if not all(isinstance(a, _SCALARS) for a in v.values()):
                return None
            v = tuple(sorted(v.items()))
        elif not isinstance(v, _SCALARS):
            return None
        out.append((k, v))
    return tuple(out)


def copy_groups(groups: List[Group]) -> List[Group]:
    """Fresh :class:`Group` and :class:`Member` objects and index maps, with the same
    sharing of index maps between members as the analysis made (editing a copy never
    reaches the cached groups). Built with the garbage collector paused (as
    :func:`fingerprint`)."""
    with gc_paused():
        return _copy_groups(groups)


def _copy_groups(groups: List[Group]) -> List[Group]:
    maps: Dict[int, list] = {}

    def index_map(m) -> list:
        key = id(m.index_map)
        if key not in maps:
            maps[key] = [list(ix) for ix in m.index_map]
        return maps[key]
    return [dataclasses.replace(g, members=[dataclasses.replace(m, index_map=index_map(m))
                                            for m in g.members]) for g in groups]


def copy_connectivity(conn: Connectivity) -> Connectivity:
    """A copy with its own containers (entries are ints and strings)."""
    out = copy.copy(conn)
    out.__dict__.update({k: copy.copy(v) for k, v in conn.__dict__.items()
                         if isinstance(v, (dict, list, set))})
    return out
