"""Module-tree twins: copies of a model's module objects that share (or map) its tensors.

Contract: :func:`module_twin` never copies tensor data unless its ``tensor_fn`` does, and
never shares a module object or a container (hooks, parameters, submodules) with the
original, so flipping a twin's training flag or swapping its tensors leaves the user's
model untouched. :func:`own_tensors` then gives a twin its own parameter and buffer
copies (ties kept) when later passes will write to them. :func:`drop_user_hooks` empties
a twin's own hook containers (the user's forward/backward hooks are not traced, not run
by any pass and not carried into the slim model; torch's own hooks stay).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch


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


# The hook containers of an nn.Module, and the per-hook flags keyed by the same ids.
HOOK_CONTAINERS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                   "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")


def _is_torch_hook(hook: Any) -> bool:
    """A hook torch itself installs as part of a module's computation (the weight
    recomputation of ``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``)."""
    fn = getattr(hook, "__func__", hook)
    owner = getattr(fn, "__module__", None) or type(fn).__module__ or ""
    return owner == "torch" or owner.startswith("torch.")


def drop_user_hooks(twin: torch.nn.Module) -> list:
    """Remove the user's forward / pre-forward / backward hooks from a twin (from its own
    hook containers: the original module keeps its hooks) and return the qualified names
    of the modules that had some. torch's own hooks (:func:`_is_torch_hook`) stay."""
    dropped = []
    for name, mod in twin.named_modules(remove_duplicate=False):
        had = False
        for key in HOOK_CONTAINERS:
            hooks = mod.__dict__.get(key)
            for hid in [h for h, fn in (hooks or {}).items() if not _is_torch_hook(fn)]:
                del hooks[hid]
                for flags in _HOOK_FLAGS:
                    mod.__dict__.get(flags, {}).pop(hid, None)
                had = True
        if had:
            dropped.append(name or "<root>")
    return dropped


def own_tensors(gm: torch.nn.Module) -> None:
    """Give ``gm`` its own copy of every parameter and buffer (ties kept)."""
    memo: dict = {}
    for mod in gm.modules():
        for key in ("_parameters", "_buffers"):
            tensors = mod.__dict__.get(key) or {}
            for name, t in tensors.items():
                if t is not None:
                    tensors[name] = copy.deepcopy(t, memo)
