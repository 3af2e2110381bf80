"""Pruning plans: which channels of which group are kept.

A :class:`Plan` is plain data (JSON round-trips) so that a plan computed once can be
replayed on a fresh copy of the same model with :func:`fxprune.apply_plan`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch

from .errors import FxpruneError, PlanError
from .group import member_spans

PLAN_FORMAT = 1


@dataclass
class Plan:
    """``kept[group id]``: sorted kept channel indices; ``sizes[group id]``: the group's
    size when the plan was made (checked on replay); ``meta``: criterion, budget, ..."""

    kept: Dict[str, List[int]]
    sizes: Dict[str, int] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        """Refuse kept lists with repeated or non-integer indices (a repeated index would
        build a slim model with fewer channels than the plan and its report count)."""
        check_kept(self.kept)

    def normalized(self) -> "Plan":
        """A copy whose kept lists are sorted Python ints, checked again: ``kept`` is a
        plain dict, so a list written into it after construction (a NumPy array, a
        tensor, floats) is refused or converted here instead of failing deep in the
        rewrite."""
        return Plan(check_kept(self.kept), dict(self.sizes), dict(self.meta))

    def to_json(self, path: str = None) -> str:
        text = json.dumps({"format": PLAN_FORMAT, "kept": self.kept, "sizes": self.sizes,
                           "meta": self.meta}, indent=1, sort_keys=True)
        if path is not None:
            write_atomic(path, text)
        return text

    @staticmethod
    def from_json(text_or_path: str) -> "Plan":
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            if not os.path.isfile(text_or_path):
                raise PlanError(f"plan file {text_or_path!r} does not exist: give the path "
                                "written by result.plan.to_json(path) or 'fxprune prune "
                                "--plan PATH' (or the plan's JSON text)")
            with open(text_or_path) as fh:
                text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FxpruneError(f"not a fxprune plan (invalid JSON): {exc}") from exc
        if not isinstance(data, dict) or "kept" not in data:
            raise FxpruneError("not a fxprune plan: expected a JSON object with a 'kept' key")
        if not isinstance(data["kept"], dict):
            raise PlanError("not a fxprune plan: 'kept' must map group ids to index lists")
        sizes = {k: int(v) for k, v in data.get("sizes", {}).items()}
        return Plan(check_kept(data["kept"]), sizes, data.get("meta", {}))

    def removed_count(self) -> int:
        return sum(self.sizes[g] - len(k) for g, k in self.kept.items() if g in self.sizes)


def check_kept(kept: Dict[str, Any]) -> Dict[str, List[int]]:
    """Every kept list holds distinct integer channel indices, else :class:`PlanError`;
    returns them as sorted lists of Python ints."""
    out: Dict[str, List[int]] = {}
    for gid, chans in kept.items():
        try:
            if isinstance(chans, (str, bytes, dict)):
                raise TypeError(chans)
            values = [_as_index(c) for c in chans]
        except (TypeError, ValueError):
            raise PlanError(f"plan group {gid!r}: kept indices must be a list of integer "
                            f"channel indices, got {chans!r}") from None
        if len(set(values)) != len(values):
            repeated = sorted({c for c in values if values.count(c) > 1})
            raise PlanError(f"plan group {gid!r}: kept indices {repeated} appear more than "
                            "once; list each kept channel exactly once (a repeated index "
                            "would keep fewer channels than the plan counts)")
        out[gid] = sorted(values)
    return out


def _as_index(value: Any) -> int:
    """``value`` as a channel index: an int (or integral number: NumPy's, a 0-d tensor's),
    never a bool or a string."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not float(value).is_integer():
        raise ValueError(value)
    return int(value)


# ----------------------------------------------------------------------------- fingerprint
def input_shapes(inputs) -> List[List[int]]:
    """The shapes of the tensor inputs, as plans record them."""
    return [list(x.shape) for x in inputs if hasattr(x, "shape") and hasattr(x, "dtype")]


def fingerprint(groups: Iterable[Any], model_name: str, input_shapes) -> Dict[str, Any]:
    """What identifies the dense model a plan was made on: its class name, the example
    input shapes, and every group's id and size (the dense analysis), plus a digest."""
    sizes = {g.id: int(g.size) for g in groups}
    data = {"model": model_name, "input_shapes": [list(s) for s in input_shapes],
            "groups": sizes}
    blob = json.dumps([model_name, sorted(sizes.items())], separators=(",", ":"))
    data["digest"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return data


def fingerprint_differences(recorded: Optional[Dict[str, Any]], current: Dict[str, Any]
                            ) -> List[str]:
    """What differs between the fingerprint a plan recorded and the current model's
    (empty when they match, or when the plan records none: plans from before
    fingerprints are checked group by group only). Input shapes are compared without
    the batch dimension and only reported together with another difference (a plan
    may be replayed at another resolution; the groups decide whether it fits)."""
    if not isinstance(recorded, dict):
        return []
    out = []
    names = (recorded.get("model"), current["model"])
    if all(names) and names[0] != names[1] and "GraphModule" not in names:
        out.append(f"the plan was made on a {recorded['model']}, this model is a "
                   f"{current['model']}")
    groups = recorded.get("groups")
    if isinstance(groups, dict) and recorded.get("digest") != current["digest"]:
        now = current["groups"]
        missing = [g for g in groups if g not in now]
        extra = [g for g in now if g not in groups]
        resized = [f"{g} ({groups[g]} -> {now[g]} channels)" for g in groups
                   if g in now and int(groups[g]) != now[g]]
        for label, names in (("group(s) of the plan's model missing here", missing),
                             ("group(s) here that the plan's model had not", extra),
                             ("group(s) of another size", resized)):
            if names:
                more = f" and {len(names) - 4} more" if len(names) > 4 else ""
                out.append(f"{len(names)} {label}: {', '.join(map(str, names[:4]))}{more}")
    if out:
        shapes = [list(s)[1:] for s in recorded.get("input_shapes") or []]
        if shapes and shapes != [list(s)[1:] for s in current["input_shapes"]]:
            out.append(f"input shapes {recorded['input_shapes']} (plan) vs "
                       f"{current['input_shapes']} (here)")
    return out


def write_atomic(path: str, text_or_bytes) -> None:
    """Write a file so that readers never see a half-written one.

    The data goes to a temporary file in the same directory, is flushed to disk and
    renamed over ``path``; on any failure (including KeyboardInterrupt) the temporary
    file is removed and an existing ``path`` keeps its old content. The new file gets
    the permissions a plain ``open(path, "w")`` would give (mode 0666 minus umask;
    ``mkstemp`` alone would leave it private, 0600)."""
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    with atomic_path(path, ".tmp") as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), mode) as fh:
            fh.write(text_or_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str, suffix: str):
    """A temporary file name next to ``path`` to write into; renamed over ``path`` when
    the block succeeds, removed when it fails. An ``OSError`` names ``path``, not the
    temporary file the user never asked for."""
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=".fxprune-", suffix=suffix)
        os.close(fd)
    except OSError as exc:
        raise _naming(exc, path) from exc
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise _naming(exc, path) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _naming(exc: OSError, path: str) -> OSError:
    """``exc`` as the same kind of error, about ``path``."""
    if exc.errno is None:
        return type(exc)(f"{path}: {exc}")
    return type(exc)(exc.errno, exc.strerror, path)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux);
    elsewhere by the set-and-restore idiom."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- checks
def check_plan(groups: Iterable[Any], plan: Plan, here: Dict[str, Any]) -> None:
    """Refuse a plan that does not fit this model: made on another architecture (its
    fingerprint differs from ``here``, this model's), or whose kept lists do not fit
    the groups (unknown, resized, unprunable, out of range, repeated or emptying)."""
    differs = fingerprint_differences(plan.meta.get("fingerprint"), here)
    if differs:
        raise PlanError("the plan does not fit this model, it was made on a different one: "
                        + "; ".join(differs)
                        + ". Apply it to the model (and input size) it was made on, or "
                        "compile a new plan for this one")
    by_id = {g.id: g for g in groups}
    problems = []
    for gid, kept in plan.kept.items():
        g = by_id.get(gid)
        if g is None:
            problems.append(f"group {gid!r} does not exist in this model")
        elif plan.sizes.get(gid, g.size) != g.size:
            problems.append(f"group {gid!r} has {g.size} channels, the plan expects {plan.sizes[gid]}")
        elif not g.prunable and len(kept) != g.size:
            problems.append(f"group {gid!r} is not prunable here ({g.reason})")
        elif not kept or min(kept) < 0 or max(kept) >= g.size:
            problems.append(f"group {gid!r}: kept indices must be 1..{g.size} channels in range")
        elif len(set(kept)) != len(kept):
            problems.append(f"group {gid!r}: kept indices repeat a channel")
        else:
            problems += emptied_members(g, set(kept))
    if problems:
        raise PlanError("the plan does not fit this model: " + "; ".join(problems[:5]))


def emptied_members(group, kept: set) -> List[str]:
    """Members of ``group`` that would lose every index under ``kept`` (a conv with
    zero output or input channels cannot run)."""
    out = []
    for span in member_spans(group):
        if not span & kept:
            names = sorted({f"`{m.target}` (dim {m.dim})" for m in group.members
                            if frozenset(c for c, ix in enumerate(m.index_map) if ix) == span})
            out.append(f"group {group.id!r}: the plan removes all of channels {sorted(span)}, "
                       f"every index of {', '.join(names[:3])}; keep at least one of them")
    return out
