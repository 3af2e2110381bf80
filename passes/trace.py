"""Front end: model -> FX GraphModule with shapes on every node.

Contract: :func:`trace` reads the user's model and never mutates it. It traces an
eval-mode copy (``self.training`` branches are baked in at trace time and pruning
analyses the inference graph), writes ``node.meta["tensor_meta"]`` (shape/dtype) and
returns a GraphModule that computes the same function.

Copies, and why they are cheap: tracing needs its own module objects (to switch them
to eval mode without touching the user's flags), not its own weights, because
symbolic tracing never reads or writes tensor data. :func:`module_twin` therefore
copies the module *tree* (every module object and its parameter/buffer/submodule/hook
containers: microseconds per module) and shares the tensors. The returned
GraphModule then gets its own copy of every parameter and buffer (one ``clone`` per
tensor, ties kept), because later passes write to it in place (unstructured masks
``mul_`` the weights, scoring sets ``requires_grad``) and the user's model must not
see that. Callers whose GraphModule never escapes and is never written to (the
analysis API: its results are groups and a connectivity table) pass
``share_params=True`` and skip that copy (their GraphModule also generates its Python
code lazily, on first call). Rewrite passes deep-copy before slicing.

Shapes are propagated on ``meta`` tensors (shape functions only: no data, no copy of
the weights), falling back to fake tensors and then to real execution for graphs
whose ops need values.
"""
from __future__ import annotations

import contextlib
import copy
import dis
import gc
import logging
import operator
import types
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Type

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from ..errors import TraceError

log = logging.getLogger(__name__)

_LEAF_TYPES: set = set()


def register_leaf(module_type: Type[torch.nn.Module]) -> Type[torch.nn.Module]:
    """Keep ``module_type`` as one opaque node when tracing (usable as a decorator).
    Its channels are unprunable unless a channel rule is registered for it."""
    _LEAF_TYPES.add(module_type)
    return module_type


class FxpruneTracer(torch.fx.Tracer):
    """Standard FX tracer plus registered leaf types; remembers the module stack so
    that a tracing failure can name the module it happened in."""

    def __init__(self, leaf_types: Iterable[type] = (), leaf_names: Iterable[str] = ()):
        super().__init__()
        self.leaf_types = tuple(set(leaf_types) | _LEAF_TYPES)
        self.leaf_names = set(leaf_names)
        self.module_stack_names: list = []
        self._param_names: Dict[int, str] = {}
        self._names_of: Optional[torch.nn.Module] = None
        self.failed_in: Optional[Tuple[str, str]] = None

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
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
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
          leaf_modules: Sequence[Any] = (), share_params: bool = False) -> torch.fx.GraphModule:
    """Trace an eval-mode copy of ``model``; propagate shapes if inputs are given.

    ``leaf_modules`` may hold module types or qualified names to keep opaque.
    ``share_params=True``: the GraphModule reads the user's parameter and buffer
    tensors instead of copies (its module objects and flags are still its own); only
    for callers that neither return it nor write to its tensors (module docstring).
    """
    with gc_paused():
        return _trace(model, example_inputs, concrete_args, leaf_modules, share_params)


def _trace(model, example_inputs, concrete_args, leaf_modules, share_params):
    if isinstance(model, torch.fx.GraphModule):
        gm = copy.deepcopy(model).eval()
    else:
        work = module_twin(model).eval()
        leaf_types = [m for m in leaf_modules if isinstance(m, type)]
        leaf_names = [m for m in leaf_modules if isinstance(m, str)]
        tracer = FxpruneTracer(leaf_types, leaf_names)
        try:
            with _memoised_disassembly():
                graph = tracer.trace(work, concrete_args=concrete_args)
        except Exception as exc:  # torch.fx raises plain TraceError/TypeError/...
            raise _explain_trace_failure(exc, tracer, model) from exc
        # Forget the tracer class: GraphModule pickles a reference to it, and a saved
        # slim model must load without fxprune installed.
        graph._tracer_cls = None
        gm = _graph_module_class(share_params)(tracer.root, graph, type(model).__name__)
        gm._tracer_cls = None
        if not share_params:
            _own_tensors(gm)
    if example_inputs is not None:
        propagate_shapes(gm, as_input_tuple(example_inputs))
    return gm


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


def _explain_trace_failure(exc: Exception, tracer: FxpruneTracer, model) -> TraceError:
    where = tracer.failed_in or ("", type(model).__name__)
    path, type_name = where
    module_txt = f"module `{path or '<root>'}` ({type_name})"
    return TraceError(
        f"torch.fx could not trace {module_txt}: {type(exc).__name__}: {exc}. "
        f"Fixes: register `{type_name}` as a leaf module "
        f"(fxprune.register_leaf({type_name}) or leaf_modules=[{type_name}]; its channels "
        "become unprunable), or pass `concrete_args` to fix the value the control flow "
        "depends on, or rewrite the data-dependent branch with torch.where.")


def module_twin(module: torch.nn.Module, tensor_fn: Optional[Callable] = None,
                memo: Optional[dict] = None) -> torch.nn.Module:
    """A copy of the module tree that shares no module object and no container with
    ``module``: each module is a shallow copy with its own ``__dict__`` containers
    (parameters, buffers, submodules, hooks; its own training flag), and each parameter
    or buffer ``t`` becomes ``tensor_fn(t)`` (the same tensor by default). Tied tensors
    and shared submodules stay tied. No tensor data is copied unless ``tensor_fn`` does."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {k: _copy_container(v) for k, v in module.__dict__.items()}
    new.__dict__.update(state)
    for key in ("_parameters", "_buffers"):
        tensors = state.get(key) or {}
        for name, t in tensors.items():
            if t is not None and tensor_fn is not None:
                if id(t) not in memo:
                    memo[id(t)] = tensor_fn(t)
                tensors[name] = memo[id(t)]
    children = state.get("_modules") or {}
    for name, child in children.items():
        if child is not None:
            children[name] = module_twin(child, tensor_fn, memo)
    return new


def _copy_container(value: Any) -> Any:
    """A shallow copy of a dict/list/set (``.copy()`` for the exact builtin types, the
    common case: 16 hook and member dicts per module), anything else unchanged."""
    kind = type(value)
    if kind is dict or kind is OrderedDict or kind is list or kind is set:
        return value.copy()
    if isinstance(value, (dict, list, set)):
        return copy.copy(value)
    return value


def _own_tensors(gm: torch.nn.Module) -> None:
    """Give ``gm`` its own copy of every parameter and buffer (ties kept)."""
    memo: dict = {}
    for mod in gm.modules():
        for key in ("_parameters", "_buffers"):
            tensors = mod.__dict__.get(key) or {}
            for name, t in tensors.items():
                if t is not None:
                    tensors[name] = copy.deepcopy(t, memo)


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs ``gm.graph`` with attributes fetched from ``root`` (a twin of ``gm`` holding
    stand-in tensors) and writes each node's ``tensor_meta`` and ``type``, like
    :class:`~torch.fx.passes.shape_prop.ShapeProp` but quiet on failure."""

    def __init__(self, gm: torch.fx.GraphModule, root: Optional[torch.nn.Module] = None):
        super().__init__(gm if root is None else root, graph=gm.graph)

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        else:
            n.meta.pop("tensor_meta", None)
        n.meta["type"] = type(result)
        return result


_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """What ShapeProp's ``_extract_tensor_metadata`` returns, with the memory format found
    by the C++ ``is_contiguous`` (the helper's Python contiguity checks were a third of
    the shape propagation time). Quantized, sparse and subclass tensors use the helper."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter or t.is_quantized \
            or t.layout != torch.strided:
        return _extract_tensor_metadata(t)
    fmt = next((f for f in _FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


_nn, _F = torch.nn, torch.nn.functional
# Direct output metadata for common ops on meta tensors: several meta kernels are Python
# decompositions (BatchNorm, LayerNorm, GELU: 1-7 ms each; a batched linear or SDPA
# 5-20 ms), which made shape propagation the slowest part of the analysis. Layouts are
# the real kernels' (checked against CPU execution): elementwise ops and BatchNorm keep
# a dense input's strides ("preserve"); LayerNorm and softmax return contiguous tensors.
_PRESERVE, _CONTIGUOUS = "preserve", "contiguous"
_ELEMENTWISE_MODULES = (_nn.ReLU, _nn.ReLU6, _nn.GELU, _nn.SiLU, _nn.Sigmoid, _nn.Tanh,
                        _nn.Hardswish, _nn.Hardsigmoid, _nn.LeakyReLU, _nn.Mish, _nn.ELU)
_MODULE_LAYOUT = {
    **{t: _PRESERVE for t in _ELEMENTWISE_MODULES},
    _nn.BatchNorm1d: _PRESERVE, _nn.BatchNorm2d: _PRESERVE, _nn.BatchNorm3d: _PRESERVE,
    _nn.LayerNorm: _CONTIGUOUS, _nn.Softmax: _CONTIGUOUS,
}
_IDENTITY_MODULES = {_nn.Identity, _nn.Dropout}
_FUNCTION_LAYOUT = {
    **{f: _PRESERVE for f in (_F.relu, _F.relu6, _F.gelu, _F.silu, _F.hardswish, _F.hardsigmoid,
                              _F.sigmoid, _F.tanh, _F.mish, _F.leaky_relu, torch.relu,
                              torch.sigmoid, torch.tanh)},
    _F.softmax: _CONTIGUOUS,
}
_METHOD_LAYOUT = {"relu": _PRESERVE, "relu_": _PRESERVE, "sigmoid": _PRESERVE,
                  "sigmoid_": _PRESERVE, "tanh": _PRESERVE, "softmax": _CONTIGUOUS}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                     operator.isub, operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


def _dense(x: torch.Tensor) -> bool:
    """Contiguous or channels-last: copying the strides is then exactly what the
    elementwise kernels do."""
    if x.dim() == 0:
        return False
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _empty(x: torch.Tensor, layout: str, shape=None) -> Optional[torch.Tensor]:
    """An empty tensor shaped like ``x`` (or ``shape``) in ``layout``, or None when the
    layout cannot be told without running the kernel. ``torch.empty_like`` itself runs a
    Python meta registration on meta tensors (40 us against 3 us)."""
    shape = tuple(x.shape) if shape is None else shape
    if layout == _CONTIGUOUS:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if not _dense(x):
        return None
    return torch.empty_strided(shape, x.stride(), dtype=x.dtype, device=x.device)


def _unary(args: tuple, kwargs: dict, layout: str) -> Optional[torch.Tensor]:
    """Output of a shape-preserving op on a floating tensor (no dtype change requested,
    every tensor operand of the same dtype), else None."""
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0):
        return None
    rest = list(args[1:]) + list(kwargs.values())
    if any(isinstance(a, torch.dtype) for a in rest) or "dtype" in kwargs:
        return None
    if any(isinstance(a, torch.Tensor) and a.dtype != x.dtype for a in rest):
        return None
    return _empty(x, layout)


def _binary(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``x op y`` for a floating ``x`` and a ``y`` of the same shape, dtype and strides
    (or a Python number)."""
    if len(args) != 2 or kwargs:
        return None
    x, y = args
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0):
        return None
    same = (isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype
            and y.stride() == x.stride())
    number = isinstance(y, (int, float)) and not isinstance(y, bool)
    return _empty(x, _PRESERVE) if same or number else None


def _fits(mod: torch.nn.Module, args: tuple) -> bool:
    """The input has the channel count / normalized shape a norm module expects (so the
    shortcut never hides a shape error the real kernel would raise)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return False
    if isinstance(mod, _nn.modules.batchnorm._BatchNorm):
        return x.dim() >= 2 and x.shape[1] == mod.num_features
    if isinstance(mod, _nn.LayerNorm):
        n = len(mod.normalized_shape)
        return tuple(x.shape[x.dim() - n:]) == tuple(mod.normalized_shape)
    return True


def _float_like(x: Any, *others: Any) -> bool:
    return (isinstance(x, torch.Tensor) and x.is_floating_point()
            and all(o is None or (isinstance(o, torch.Tensor) and o.dtype == x.dtype) for o in others))


def _linear(x: Any, weight: Any, bias: Any = None) -> Optional[torch.Tensor]:
    """Linear on a contiguous input: a contiguous ``[..., out_features]`` tensor."""
    if not (_float_like(x, weight, bias) and x.dim() >= 1 and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] and x.is_contiguous()):
        return None
    return _empty(x, _CONTIGUOUS, tuple(x.shape[:-1]) + (weight.shape[0],))


def _sdpa(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """scaled_dot_product_attention with equal batch dims: ``q.shape[:-1] + (Ev,)``."""
    names = ("query", "key", "value")
    q, k, v = (args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names))
    if not (_float_like(q, k, v) and q.dim() >= 2 and k.dim() == q.dim() == v.dim()):
        return None
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and q.shape[-1] == k.shape[-1]
            and k.shape[-2] == v.shape[-2]) or kwargs.get("enable_gqa"):
        return None
    return _empty(q, _CONTIGUOUS, tuple(q.shape[:-1]) + (v.shape[-1],))


def _layer_norm(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """F.layer_norm(x, normalized_shape, ...), as timm's norms call it."""
    if len(args) < 2 or not isinstance(args[0], torch.Tensor):
        return None
    x, shape = args[0], tuple(args[1])
    if tuple(x.shape[x.dim() - len(shape):]) != shape:
        return None
    return _unary(args[:1] + args[2:], kwargs, _CONTIGUOUS)


def _batch_norm(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...), as timm's
    BatchNormAct calls it: every statistic/affine tensor has x's channel count."""
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and x.dim() >= 2):
        return None
    stats = [a for a in list(args[1:5]) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    if any(t.shape != (x.shape[1],) for t in stats):
        return None
    return _unary(args, kwargs, _PRESERVE)


def _function_shape(target: Any, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if target in _FUNCTION_LAYOUT:
        return _unary(args, kwargs, _FUNCTION_LAYOUT[target])
    if target in _BINARY_FUNCTIONS:
        return _binary(args, kwargs)
    if target is _F.linear and len(args) >= 2:
        return _linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
    if target is _F.scaled_dot_product_attention:
        return _sdpa(args, kwargs)
    if target is _F.layer_norm:
        return _layer_norm(args, kwargs)
    if target is _F.batch_norm:
        return _batch_norm(args, kwargs)
    return None


class _MetaShapeRecorder(_ShapeRecorder):
    """:class:`_ShapeRecorder` on meta tensors, answering the ops above directly."""

    def call_function(self, target, args, kwargs):
        out = _function_shape(target, args, kwargs)
        return out if out is not None else super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        out = None
        if target in _METHOD_LAYOUT:
            out = _unary(args, kwargs, _METHOD_LAYOUT[target])
        elif target in _BINARY_METHODS:
            out = _binary(args, kwargs)
        return out if out is not None else super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        kind = type(mod)
        if kind in _IDENTITY_MODULES and len(args) == 1 and not kwargs:
            return args[0]  # what eval-mode Identity/Dropout return: the input itself
        out = None
        if kind in _MODULE_LAYOUT and _fits(mod, args):
            out = _unary(args, kwargs, _MODULE_LAYOUT[kind])
        elif kind is _nn.Linear and len(args) == 1 and not kwargs:
            out = _linear(args[0], mod.weight, mod.bias)
        return out if out is not None else super().call_module(target, args, kwargs)


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t, device="meta")
    if isinstance(t, torch.nn.Parameter):
        out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out


def _run_meta(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]) -> None:
    root = module_twin(gm, _to_meta)
    args = [_to_meta(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.no_grad():
        _MetaShapeRecorder(gm, root).run(*args)


def _run_fake(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    root = module_twin(gm, mode.from_tensor)
    args = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.no_grad(), mode:
        _ShapeRecorder(gm, root).run(*args)


def propagate_shapes(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]) -> None:
    """Write ``tensor_meta`` on every node. Runs on meta tensors first (shape functions
    only), then on fake tensors, then for real (exact, for ops that need values)."""
    for name, run in (("meta", _run_meta), ("fake", _run_fake)):
        try:
            run(gm, inputs)
            return
        except Exception as exc:  # an op without a meta/fake kernel, or one that reads values
            log.debug("%s shape propagation failed (%s); trying the next mode", name, exc)
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*inputs)
    except Exception as exc:
        raise TraceError(f"the traced graph fails on the example inputs: {type(exc).__name__}: "
                         f"{exc}. Check that example_inputs match the model's expected input.") from exc
