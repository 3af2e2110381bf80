"""Front end: model -> FX GraphModule with shapes on every node.

Contract: :func:`trace` reads the user's model and never mutates it (it traces an
eval-mode deep copy, because ``self.training`` branches are baked in at trace time
and pruning analyses the inference graph). It writes ``node.meta["tensor_meta"]``
(shape/dtype, via :class:`torch.fx.passes.shape_prop.ShapeProp`, on fake tensors
where possible) and returns a GraphModule that computes the same function.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Type

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

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
        self.failed_in: Optional[Tuple[str, str]] = None

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


def trace(model: torch.nn.Module, example_inputs: Any = None, *,
          concrete_args: Optional[Dict[str, Any]] = None,
          leaf_modules: Sequence[Any] = ()) -> torch.fx.GraphModule:
    """Trace an eval-mode copy of ``model``; propagate shapes if inputs are given.

    ``leaf_modules`` may hold module types or qualified names to keep opaque.
    """
    if isinstance(model, torch.fx.GraphModule):
        gm = copy.deepcopy(model).eval()
    else:
        work = copy.deepcopy(model).eval()
        leaf_types = [m for m in leaf_modules if isinstance(m, type)]
        leaf_names = [m for m in leaf_modules if isinstance(m, str)]
        tracer = FxpruneTracer(leaf_types, leaf_names)
        try:
            graph = tracer.trace(work, concrete_args=concrete_args)
        except Exception as exc:  # torch.fx raises plain TraceError/TypeError/...
            raise _explain_trace_failure(exc, tracer, model) from exc
        # Forget the tracer class: GraphModule pickles a reference to it, and a saved
        # slim model must load without fxprune installed.
        graph._tracer_cls = None
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        gm._tracer_cls = None
    if example_inputs is not None:
        propagate_shapes(gm, as_input_tuple(example_inputs))
    return gm


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


def propagate_shapes(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]) -> None:
    """Write ``tensor_meta`` on every node. Tries fake tensors first (no compute),
    then falls back to real execution for ops without fake support."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
        ShapeProp(gm, fake_mode=mode).propagate(*fake_inputs)
        return
    except Exception as exc:  # fake mode lacks some ops; real execution is exact
        log.debug("fake shape propagation failed (%s); running for real", exc)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise TraceError(f"the traced graph fails on the example inputs: {type(exc).__name__}: "
                         f"{exc}. Check that example_inputs match the model's expected input.") from exc
