"""Front end: model -> FX GraphModule with shapes on every node.

Contract: :func:`trace` reads the user's model and never mutates it. It traces an
eval-mode copy (``self.training`` branches are baked in at trace time and pruning
analyses the inference graph), writes ``node.meta["tensor_meta"]`` (shape/dtype) and
returns a GraphModule that computes the same function.

Copies, and why they are cheap: tracing needs its own module objects (to switch them
to eval mode without touching the user's flags), not its own weights, because
symbolic tracing never reads or writes tensor data. :func:`module_twin` therefore
copies the module *tree* (every module object and its parameter/buffer/submodule/hook
containers: microseconds per module) and shares the parameters. Buffers and plain tensor
attributes are copied (they are small), because a forward that updates them in place
(``self.calls.add_(1)``) runs that update for real while it is traced; the copies get
the user's values back after tracing. User hooks are dropped from the twin
(:func:`.twin.drop_user_hooks`): the graph, every pass and the slim model run without
them, and a warning names the modules. The returned
GraphModule then gets its own copy of every parameter and buffer (one ``clone`` per
tensor, ties kept), because later passes write to it in place (unstructured masks
``mul_`` the weights, scoring sets ``requires_grad``) and the user's model must not
see that. Callers whose GraphModule never escapes and is never written to (the
analysis API: its results are groups and a connectivity table) pass
``share_params=True`` and skip that copy (their GraphModule also generates its Python
code lazily, on first call); so does structured ``compile``, whose dense graph is only
read (scoring that sets ``requires_grad`` or casts works on its own scoring copy, the
rewrite builds the slim model from slices and clones, verification masks per node).

Shapes are propagated by :mod:`.shape_prop`; module twins live in :mod:`.twin`.
"""
from __future__ import annotations

import contextlib
import copy
import dis
import gc
import logging
import types
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Type

import torch
import torch.fx

from ..errors import TraceError
from ..registry import Registry
from .constants import name_constants
from .shape_prop import propagate_shapes
from .twin import drop_user_hooks, module_twin, own_tensors

log = logging.getLogger(__name__)

_LEAF_TYPES = Registry("leaf module type")


def register_leaf(module_type: Type[torch.nn.Module]) -> Type[torch.nn.Module]:
    """Keep ``module_type`` as one opaque node when tracing (usable as a decorator).
    Its channels are unprunable unless a channel rule is registered for it."""
    return _LEAF_TYPES.add(module_type, module_type)


class FxpruneTracer(torch.fx.Tracer):
    """Standard FX tracer plus registered leaf types; remembers the module stack so
    that a tracing failure can name the module it happened in."""

    def __init__(self, leaf_types: Iterable[type] = (), leaf_names: Iterable[str] = (),
                 retry_types: Iterable[type] = ()):
        super().__init__()
        self.leaf_types = tuple(set(leaf_types) | set(_LEAF_TYPES))
        self.leaf_names = set(leaf_names)
        self.retry_types = set(retry_types)  # exact types kept whole by the leaf retry
        self.module_stack_names: list = []
        self._param_names: Dict[int, str] = {}
        self._names_of: Optional[torch.nn.Module] = None
        self.failed_in: Optional[Tuple[str, str]] = None
        self.retried: list = []  # gm.meta[LEAF_RETRIES] entries of the leaf retry

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        """A parameter read inside a traced module becomes a ``get_attr`` node. torch.fx
        finds its name by walking ``root.named_parameters()`` on every read (quadratic in
        model size: a third of the tracing time of a ViT-B); look it up in a map instead."""
        if isinstance(attr_val, torch.nn.Parameter) and not self.param_shapes_constant:
            if self._names_of is not self.root:  # built once per traced root
                self._param_names = {id(p): n for n, p in self.root.named_parameters()}
                self._names_of = self.root
            name = self._param_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if (isinstance(m, self.leaf_types) or qualname in self.leaf_names
                or type(m) in self.retry_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.module_stack_names.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # remember the innermost module the failure happened in (the stack is
            # unwound by the time the caller sees the exception)
            if self.failed_in is None:
                self.failed_in = self.module_stack_names[-1]
            raise
        finally:
            self.module_stack_names.pop()


def as_input_tuple(example_inputs: Any) -> Tuple[Any, ...]:
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector. Tracing (torch.fx disassembles frames for
    tuple unpacking), shape propagation and group assembly (~10^5 small index lists)
    allocate in bursts that would otherwise trigger collections walking the whole heap
    (a timm model's worth of objects): 2-4x slower. Cycles made meanwhile are collected
    at the next collection after the pause."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def trace(model: torch.nn.Module, example_inputs: Any = None, *,
          concrete_args: Optional[Dict[str, Any]] = None,
          leaf_modules: Sequence[Any] = (), share_params: bool = False,
          lazy: Optional[bool] = None) -> torch.fx.GraphModule:
    """Trace an eval-mode copy of ``model``; propagate shapes if inputs are given.

    ``leaf_modules`` may hold module types or qualified names to keep opaque.
    ``share_params=True``: the GraphModule reads the user's parameter and buffer
    tensors instead of copies (its module objects and flags are still its own); only
    for callers that neither return it nor write to its tensors (module docstring).
    ``lazy``: generate the GraphModule's code on first call (default: when
    ``share_params``, the analysis API's case; ``compile`` shares but runs the graph).
    """
    with gc_paused():
        return _trace(model, example_inputs, concrete_args, leaf_modules, share_params,
                      share_params if lazy is None else lazy)


def _trace(model, example_inputs, concrete_args, leaf_modules, share_params, lazy):
    if isinstance(model, torch.fx.GraphModule):
        gm = copy.deepcopy(model).eval()
        _note_dropped_hooks(drop_user_hooks(gm), model)
    else:
        graph, tracer, copies = _trace_with_leaf_retry(model, concrete_args, leaf_modules)
        _reset_copies(copies)
        name_constants(graph, tracer.root)
        # Forget the tracer class: GraphModule pickles a reference to it, and a saved
        # slim model must load without fxprune installed.
        graph._tracer_cls = None
        gm = _graph_module_class(lazy)(tracer.root, graph, type(model).__name__)
        gm._tracer_cls = None
        gm.meta[LEAF_RETRIES] = tracer.retried
        if not share_params:
            own_tensors(gm)
    if example_inputs is not None:
        propagate_shapes(gm, as_input_tuple(example_inputs))
    return gm


#: ``gm.meta`` key: ``[(first qualified name, type name, tracing error, instances), ...]``
#: of the module types kept whole as leaves because symbolic tracing failed inside one.
LEAF_RETRIES = "fxprune_leaf_retries"
#: ``node.meta`` key of such a leaf's ``call_module`` node: why its channels are fixed.
LEAF_REASON = "fxprune_leaf_reason"
_MAX_LEAF_RETRIES = 8


def _trace_with_leaf_retry(model, concrete_args, leaf_modules):
    """Trace a twin of ``model``; when tracing fails inside a submodule (data-dependent
    control flow, ``len`` of a Proxy, ...), trace again with that submodule's type as a
    leaf (every module of exactly that type: they run the same code, and one retry per
    instance would re-trace a model with an attention block per layer dozens of times).
    A leaf's channels are fixed, with a reason naming it and the error, unless a channel
    rule covers its type (timm's ``Conv2dSame`` is a ``Conv2d``); the rest of the model
    stays prunable. Up to :data:`_MAX_LEAF_RETRIES` types; a failure in the root's own
    forward (or a repeated one) raises :class:`TraceError` with the fixes. Returns
    ``(graph, tracer, copies)``; ``tracer.retried`` lists the leaf types added."""
    leaf_types = [m for m in leaf_modules if isinstance(m, type)]
    leaf_names = [m for m in leaf_modules if isinstance(m, str)]
    retried: list = []  # (path, type name, error, type)
    while True:
        copies: list = []
        work = module_twin(model, _private_buffer(copies)).eval()
        _private_tensor_attributes(work, copies)
        dropped = drop_user_hooks(work)
        tracer = FxpruneTracer(leaf_types, leaf_names, [r[3] for r in retried])
        try:
            with _memoised_disassembly():
                graph = tracer.trace(work, concrete_args=concrete_args)
            break
        except Exception as exc:  # torch.fx raises plain TraceError/TypeError/...
            path, type_name = tracer.failed_in or ("", type(model).__name__)
            kind = type(work.get_submodule(path)) if path else None
            if kind is None or len(retried) >= _MAX_LEAF_RETRIES or any(r[3] is kind for r in retried):
                raise _explain_trace_failure(exc, tracer, model, retried) from exc
            retried.append((path, type_name, f"{type(exc).__name__}: {_first_line(exc)}", kind))
    _note_dropped_hooks(dropped, model)
    tracer.retried = _mark_leaves(graph, tracer.root, retried, type(model).__name__)
    return graph, tracer, copies


def _mark_leaves(graph, root, retried, model_name: str) -> list:
    """Give each retried leaf's ``call_module`` node its reason; warn once per type.
    Returns the ``gm.meta`` entries (types with no instance left in the graph, inside
    a later leaf, are dropped)."""
    entries = []
    for path, type_name, error, kind in retried:
        nodes = [n for n in graph.nodes
                 if n.op == "call_module" and type(root.get_submodule(n.target)) is kind]
        for node in nodes:
            node.meta[LEAF_REASON] = leaf_reason(node.target, type_name, error, path)
        if nodes:
            entries.append((path, type_name, error, len(nodes)))
            log.warning("%s: torch.fx could not trace `%s` (%s: %s); %s kept as a leaf "
                        "module: its channels are fixed, the rest of the model is pruned. To "
                        "prune inside it, pass concrete_args or rewrite its data-dependent "
                        "branch with torch.where", model_name, path, type_name, error,
                        "it is" if len(nodes) == 1 else f"every {type_name} ({len(nodes)}) is")
    return entries


def leaf_reason(path: str, type_name: str, error: str, failed: str = "") -> str:
    """Why the channels of a retried leaf are fixed (the groups' reason)."""
    where = "inside it" if not failed or failed == path else f"inside `{failed}`, also a {type_name}"
    return (f"`{path}` ({type_name}) is kept whole as a leaf module: symbolic tracing "
            f"failed {where} ({error}); pass concrete_args or rewrite its data-dependent "
            "branch with torch.where to prune it")


def leaf_notes(gm: torch.fx.GraphModule) -> list:
    """One report note per module type kept as a leaf by the tracing retry."""
    notes = []
    for path, type_name, error, count in gm.meta.get(LEAF_RETRIES, ()):
        more = f" (and the {count - 1} other {type_name} modules)" if count > 1 else ""
        notes.append(f"tracing: {leaf_reason(path, type_name, error)}{more}")
    return notes


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _private_buffer(copies: list):
    """``tensor_fn`` for :func:`module_twin`: parameters are shared (symbolic tracing
    turns their reads into graph nodes), buffers are copied, because a forward that
    updates a buffer in place (``self.calls.add_(1)``) runs that update for real while
    it is traced. ``(original, copy)`` pairs are appended to ``copies``."""
    def private(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter):
            return t
        out = t.detach().clone()
        if t.requires_grad:
            out.requires_grad_(True)
        copies.append((t, out))
        return out
    return private


def _private_tensor_attributes(work: torch.nn.Module, copies: list) -> None:
    """Plain tensor attributes of the twin's modules (neither parameter nor buffer) get
    copies too, for the same reason as buffers (ties kept)."""
    seen: Dict[int, torch.Tensor] = {}
    for mod in work.modules():
        for key, value in list(mod.__dict__.items()):
            if type(value) is torch.Tensor:
                if id(value) not in seen:
                    seen[id(value)] = value.detach().clone()
                    copies.append((value, seen[id(value)]))
                mod.__dict__[key] = seen[id(value)]


def _reset_copies(copies: list) -> None:
    """Give the copies the user's values again: what the forward wrote into them while
    it was traced is undone, so the traced graph starts from the model's state."""
    with torch.no_grad():
        for original, private in copies:
            if private.shape == original.shape:
                private.copy_(original)


def _note_dropped_hooks(modules: list, model: torch.nn.Module) -> None:
    """Say once per trace that user hooks are left out (README, Limits)."""
    if modules:
        more = f" and {len(modules) - 3} more" if len(modules) > 3 else ""
        log.warning("%s: the forward/backward hooks of %s%s are not traced: analysis, "
                    "scoring and verification run without them and the slim model carries "
                    "none (register them on the slim model if you need them)",
                    type(model).__name__, ", ".join(modules[:3]), more)


class _MemoDis:
    """The ``dis`` module with ``get_instructions`` memoised per code object. torch.fx
    disassembles the calling function on every tuple unpacking of a proxy
    (``B, N, C = x.shape``, ``q, k, v = qkv.unbind(0)``): once per block of a ViT, the
    same code each time, a third of its tracing time."""

    def __init__(self):
        self._cache: Dict[types.CodeType, list] = {}

    def get_instructions(self, x, *args, **kwargs):
        if args or kwargs or not isinstance(x, types.CodeType):
            return dis.get_instructions(x, *args, **kwargs)
        if x not in self._cache:
            self._cache[x] = list(dis.get_instructions(x))
        return iter(self._cache[x])

    def __getattr__(self, name: str) -> Any:
        return getattr(dis, name)


@contextlib.contextmanager
def _memoised_disassembly():
    """Within one trace, torch.fx.proxy sees :class:`_MemoDis` as its ``dis`` (the
    same results: instructions of an immutable code object; restored afterwards)."""
    import torch.fx.proxy as fx_proxy
    if getattr(fx_proxy, "dis", None) is not dis:  # another trace holds it, or torch changed
        yield
        return
    fx_proxy.dis = _MemoDis()
    try:
        yield
    finally:
        fx_proxy.dis = dis


def _graph_module_class(lazy: bool) -> type:
    """The analysis (``share_params``) never runs the GraphModule's Python code, so it
    gets torch.fx's lazy GraphModule, which generates that code on first call (the
    codegen is a tenth of the analysis time of a ResNet-50); otherwise a plain one."""
    if lazy:
        try:
            from torch.fx._lazy_graph_module import _LazyGraphModule
            return _LazyGraphModule
        except ImportError:  # private API: fall back quietly
            pass
    return torch.fx.GraphModule


def _explain_trace_failure(exc: Exception, tracer: FxpruneTracer, model,
                           retried=()) -> TraceError:
    where = tracer.failed_in or ("", type(model).__name__)
    path, type_name = where
    module_txt = f"module `{path or '<root>'}` ({type_name})"
    tried = (f" (already kept as leaf modules after tracing failed inside them: "
             f"{', '.join(f'`{r[0]}` ({r[1]})' for r in retried)})" if retried else "")
    return TraceError(
        f"torch.fx could not trace {module_txt}{tried}: {type(exc).__name__}: {exc}. "
        f"Fixes: register `{type_name}` as a leaf module "
        f"(fxprune.register_leaf({type_name}) or leaf_modules=[{type_name}]; its channels "
        "become unprunable), or pass `concrete_args` to fix the value the control flow "
        "depends on, or rewrite the data-dependent branch with torch.where.")
