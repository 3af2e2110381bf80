"""``compile(..., ignore=...)``: which groups a user keeps whole.

An entry names a module (``"layer4"`` keeps every group whose producer lies inside
``layer4``), a parameter's module path, or a glob over module names (``"layer*.0.conv1"``).
A string is one name. An entry that matches nothing is an error with the close
matches: it would otherwise protect nothing, silently.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Sequence

import torch

from .errors import UnknownNameError


def ignored(group, ignore: Sequence[str]) -> bool:
    """Does an ``ignore`` entry (a module name, its prefix, or a glob) name one of the
    group's producers?"""
    modules = {m.target.rsplit(".", 1)[0] for m in group.members if m.role == "producer"}
    return any(_matches(mod, ig) for mod in modules for ig in ignore)


def _matches(name: str, pattern: str) -> bool:
    """``name`` is ``pattern``, lies inside it (``layer4`` covers ``layer4.0.conv1``) or
    matches it as a glob (``layer*.0.conv1``)."""
    if name == pattern or name.startswith(pattern + "."):
        return True
    return any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern)


def resolve_ignore(model: torch.nn.Module, ignore) -> tuple:
    """``ignore`` as a tuple of names (a string is one name, not its characters). A name
    or pattern that matches no module or parameter of ``model`` raises
    :class:`UnknownNameError` with the close matches: it would protect nothing."""
    if ignore is None:
        return ()
    if not isinstance(ignore, (str, list, tuple, set, frozenset)):
        raise UnknownNameError(f"ignore={ignore!r}: give a module name or a list of them, "
                               "e.g. ignore=['layer4', 'head']")
    names = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    if any(not isinstance(n, str) for n in names):
        raise UnknownNameError(f"ignore={ignore!r}: give module names (strings), e.g. "
                               "ignore=['layer4', 'head']")
    known = [n for n, _ in model.named_modules() if n]
    known += [n for n, _ in model.named_parameters()]
    for name in names:
        if not any(_matches(k, name) for k in known):
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = (f"close matches: {', '.join(close)}" if close else
                    f"its modules include {', '.join(known[:5])}")
            raise UnknownNameError(f"ignore: {name!r} matches no module of "
                                   f"{type(model).__name__} ({hint}); it would protect "
                                   "nothing - use a qualified module name or a glob")
    return names
