"""Shape propagation: ``node.meta["tensor_meta"]`` and ``node.meta["type"]`` on every node.

Contract: :func:`propagate_shapes` reads a GraphModule and example inputs and writes only
node metadata (the module, its weights and the inputs are untouched). It runs on ``meta``
tensors first (shape functions only: no data, no copy of the weights), with direct
shortcuts for common ops whose meta kernels are slow Python decompositions, then falls
back to fake tensors and finally to real execution for graphs whose ops need values.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Optional, Tuple

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from ..errors import TraceError
from .twin import module_twin

log = logging.getLogger(__name__)


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


def _copy(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    if isinstance(t, torch.nn.Parameter):
        out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out


def _run_real(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]) -> None:
    """Real execution on copies of the weights and inputs: the graph may update a buffer
    or an input in place, and ``gm`` may share its tensors with the user's model."""
    root = module_twin(gm, _copy)
    args = [_copy(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.no_grad():
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
        _run_real(gm, inputs)
    except Exception as exc:
        raise TraceError(f"the traced graph fails on the example inputs: {type(exc).__name__}: "
                         f"{exc}. Check that example_inputs match the model's expected input.") from exc
