"""Model registry: named factories plus ``timm:``, ``torchvision:`` and ``file.py:factory`` specs.

A model *spec* is one of

- a registered name (``tiny_resnet``, ``cifar_vgg19``, ...; see :func:`list_models`),
- ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False, **kwargs)``,
- ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME, weights=None, **kwargs)``,
- ``path/to/file.py:factory`` -- the file is imported and ``factory(**kwargs)`` is called.

Weights are never downloaded; pass ``checkpoint=`` to load local weights instead.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn

from ..errors import DuplicateNameError, FxpruneError

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "torchvision:"
_TORCHVISION_INPUT_SIZE = (3, 224, 224)


class UnknownModelError(FxpruneError, ValueError):
    """A model spec names no registered model, timm model, torchvision model or factory."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its factory, a one-line description and its input size.

    ``input_size`` is the shape of one example without the batch dimension, e.g.
    ``(3, 32, 32)`` for an image net, ``(16,)`` for an MLP, ``(8, 16)`` for tokens.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str
    input_size: Tuple[int, ...]


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: str, description: str, input_size: Tuple[int, ...]):
    """Decorator that registers ``factory(num_classes=..., **kwargs) -> nn.Module`` as ``name``."""
    if ":" in name:
        raise ValueError(f"registered model names cannot contain ':' ({name!r})")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            # the policy of every fxprune registry (fxprune/registry.py)
            raise DuplicateNameError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, factory, description, tuple(input_size))
        return factory

    return decorator


def list_models(pattern: str = "*") -> List[str]:
    """Sorted registered names matching the fnmatch ``pattern``.

    ``list_models("timm:*vit*")`` and ``list_models("torchvision:res*")`` pass the rest
    of the pattern through to timm / torchvision and return prefixed names.
    """
    if pattern.startswith(TIMM_PREFIX):
        import timm

        return [TIMM_PREFIX + n for n in timm.list_models(pattern[len(TIMM_PREFIX):] or "*")]
    if pattern.startswith(TORCHVISION_PREFIX):
        import torchvision

        rest = pattern[len(TORCHVISION_PREFIX):] or "*"
        names = torchvision.models.list_models()
        return sorted(TORCHVISION_PREFIX + n for n in names if fnmatch.fnmatchcase(n, rest))
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(_unknown_message(name, list(_REGISTRY), "registered model")) from None


def model_info(name: str) -> str:
    """The description a registered model was registered with."""
    return _entry(name).description


def model_input_size(name: str) -> Tuple[int, ...]:
    """Default input shape (without batch dim) of a registered, ``timm:`` or ``torchvision:`` model."""
    if name.startswith(TIMM_PREFIX):
        import timm

        cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX):])
        if cfg is None:
            raise UnknownModelError(_unknown_message(name[len(TIMM_PREFIX):], timm.list_models(),
                                                     "timm model (no default configuration)"))
        return tuple(cfg.input_size)
    if name.startswith(TORCHVISION_PREFIX):
        return _TORCHVISION_INPUT_SIZE
    return _entry(name).input_size


def _unknown_message(name: str, candidates: List[str], kind: str) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"unknown {kind} {name!r}.{hint} Registered models: list_models(); timm models: "
        f"'timm:NAME'; torchvision models: 'torchvision:NAME'; your own: 'path/to/file.py:factory'."
    )


def _split_file_spec(spec: str) -> Optional[Tuple[str, str]]:
    """``'dir/net.py:build'`` -> ``('dir/net.py', 'build')``; ``None`` for other specs."""
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py") and factory:
        return path, factory
    return None


def _create_timm(name: str, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise UnknownModelError(_unknown_message(name, timm.list_models(), "timm model"))
    return timm.create_model(name, pretrained=False, **kwargs)


def _create_torchvision(name: str, **kwargs) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name.lower() not in names:
        raise UnknownModelError(_unknown_message(name, names, "torchvision model"))
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _create_from_file(path: str, factory: str, **kwargs) -> nn.Module:
    """Import ``path`` as a fresh module and call ``factory(**kwargs)``."""
    if not os.path.isfile(path):
        raise UnknownModelError(f"model file {path!r} does not exist (spec '{path}:{factory}')")
    mod_name = "fxprune_user_model_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses / pickling look the module up here
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(mod_name, None)
        raise
    fn = getattr(module, factory, None)
    if not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise UnknownModelError(_unknown_message(factory, public, f"factory in {path}"))
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise FxpruneError(f"{path}:{factory} returned {type(model).__name__}, not an nn.Module")
    return model


def create_model(name: str, checkpoint: Optional[str] = None, *, allow_pickle: bool = False,
                 **kwargs) -> nn.Module:
    """Build the model named by ``name`` (see module docstring) with random weights.

    ``kwargs`` go to the factory (e.g. ``num_classes``). When ``checkpoint`` is given the
    weights are loaded strictly with :func:`fxprune.models.load_checkpoint`, which unpickles
    Python objects only with ``allow_pickle=True``.
    Registered models get an ``input_size`` attribute (shape without batch dim) unless
    their factory already set one.
    """
    if name.startswith(TIMM_PREFIX):
        model = _create_timm(name[len(TIMM_PREFIX):], **kwargs)
    elif name.startswith(TORCHVISION_PREFIX):
        model = _create_torchvision(name[len(TORCHVISION_PREFIX):], **kwargs)
    elif _split_file_spec(name) is not None:
        model = _create_from_file(*_split_file_spec(name), **kwargs)
    else:
        entry = _entry(name)
        model = entry.factory(**kwargs)
        if not hasattr(model, "input_size"):
            model.input_size = entry.input_size
    if checkpoint is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint, allow_pickle=allow_pickle)
    logger.debug("created model %s (%s)", name, type(model).__name__)
    return model
