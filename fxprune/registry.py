"""One registry style for criteria, channel rules and leaf modules.

A :class:`Registry` maps keys (a criterion name, a module type, a function, a method
name) to entries. The one duplicate policy: registering a key again with a *different*
entry raises :class:`~fxprune.errors.DuplicateNameError` unless ``overwrite=True``;
registering the identical entry again is a no-op (a module imported twice). Entries are
added through decorators (``@registry.register(key, ...)``) or :meth:`Registry.add`.
(``models/`` keeps its own registry with the same policy: it imports nothing of
fxprune but its errors.)
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Iterable

from .errors import DuplicateNameError

__all__ = ["Registry", "generation"]

_GENERATION = [0]  # bumped by every registration in any registry


def generation() -> int:
    """A number that changes whenever any registry gains or replaces an entry (the
    analysis cache, :mod:`fxprune.analysis_cache`, keys on it: a rule or leaf type
    registered since an analysis makes a new one)."""
    return _GENERATION[0]


class Registry(Dict[Hashable, Any]):
    """A dict with the registration policy above; ``what`` names the entries in errors."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def add(self, key: Hashable, entry: Any, *, overwrite: bool = False) -> Any:
        """Register ``entry`` under ``key``; returns ``entry``."""
        if key in self and self[key] is not entry and not overwrite:
            raise DuplicateNameError(f"{self.what} {_name(key)} is already registered; "
                                     "pass overwrite=True to replace it")
        self[key] = entry
        return entry

    def __setitem__(self, key: Hashable, entry: Any) -> None:
        _GENERATION[0] += 1
        super().__setitem__(key, entry)

    def __delitem__(self, key: Hashable) -> None:
        _GENERATION[0] += 1
        super().__delitem__(key)

    def pop(self, key: Hashable, *default: Any) -> Any:
        _GENERATION[0] += 1
        return super().pop(key, *default)

    def register(self, *keys: Hashable, overwrite: bool = False) -> Callable[[Any], Any]:
        """Decorator: register the decorated object under every key of ``keys``."""
        def decorator(entry: Any) -> Any:
            for key in keys:
                self.add(key, entry, overwrite=overwrite)
            return entry
        return decorator

    def names(self) -> Iterable[str]:
        return sorted(_name(k) for k in self)


def _name(key: Hashable) -> str:
    if isinstance(key, str):
        return repr(key)
    return getattr(key, "__qualname__", None) or repr(key)
