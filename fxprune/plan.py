"""Pruning plans: which channels of which group are kept.

A :class:`Plan` is plain data (JSON round-trips) so that a plan computed once can be
replayed on a fresh copy of the same model with :func:`fxprune.apply_plan`.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List

from .errors import FxpruneError

PLAN_FORMAT = 1


@dataclass
class Plan:
    """``kept[group id]``: sorted kept channel indices; ``sizes[group id]``: the group's
    size when the plan was made (checked on replay); ``meta``: criterion, budget, ..."""

    kept: Dict[str, List[int]]
    sizes: Dict[str, int] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

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
            with open(text_or_path) as fh:
                text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FxpruneError(f"not a fxprune plan (invalid JSON): {exc}") from exc
        if not isinstance(data, dict) or "kept" not in data:
            raise FxpruneError("not a fxprune plan: expected a JSON object with a 'kept' key")
        kept = {gid: sorted(int(c) for c in chans) for gid, chans in data["kept"].items()}
        return Plan(kept, {k: int(v) for k, v in data.get("sizes", {}).items()},
                    data.get("meta", {}))

    def removed_count(self) -> int:
        return sum(self.sizes[g] - len(k) for g, k in self.kept.items() if g in self.sizes)


def write_atomic(path: str, text_or_bytes) -> None:
    """Write a file so that readers never see a half-written one.

    The data goes to a temporary file in the same directory, is flushed to disk and
    renamed over ``path``; on any failure (including KeyboardInterrupt) the temporary
    file is removed and an existing ``path`` keeps its old content. The new file gets
    the permissions a plain ``open(path, "w")`` would give (mode 0666 minus umask;
    ``mkstemp`` alone would leave it private, 0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fxprune-", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(text_or_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
