"""Loading local weights into a model with readable mismatch errors.

Supported files: ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` (``torch.load``) and
``.safetensors``. ``torch.load`` files are read with ``weights_only=True``: a file that
pickles a Python object (which unpickling would construct, running code stored in the
file) is refused unless the caller opts in with ``allow_pickle=True`` (the command
line's ``--allow-pickle``), as ``torch.load`` itself does since torch 2.6. The file may hold a bare state dict or one wrapped under
``state_dict``, ``model``, ``model_ema`` or ``state_dict_ema`` (first found wins); a
DDP ``module.`` prefix or a ``torch.compile`` ``_orig_mod.`` prefix is stripped.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema")
STRIP_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5
_READER = "torch.load(weights_only=True)"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _short_reason(exc: BaseException) -> str:
    """The informative part of a (long) ``torch.load`` error message."""
    msg = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
    text = m.group(1) if m else msg
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _file_kind(path: str) -> str:
    """What the first bytes of ``path`` say it is (for the corrupt-file message)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK"):
        return f"a zip archive, the format torch.save writes ({size} bytes)"
    if head[:1] == b"\x80":
        return f"a pickle, the legacy torch.save format ({size} bytes)"
    if len(head) > 8 and head[8:9] == b"{":
        return f"what looks like a safetensors file named without .safetensors ({size} bytes)"
    return f"neither a zip archive nor a pickle ({size} bytes): not a torch.save file"


def corrupt_message(path: str, exc: BaseException, reader: str) -> str:
    """Say the file is corrupt or truncated, which format was tried, and what to do --
    instead of the reader's internal error alone ("pop from empty list", "EOFError")."""
    kind = _file_kind(path)
    if reader.startswith("safetensors"):  # named .safetensors: only its size is telling
        kind = kind if kind.startswith("an empty") else f"{os.path.getsize(path)} bytes long"
    reason = _short_reason(exc)
    failed = type(exc).__name__ + (f": {reason}" if reason != type(exc).__name__ else "")
    if "safetensors file named" in kind:
        return (f"{path}: cannot read checkpoint: it is {kind}, so {reader} failed with "
                f"{failed}. Rename it to end in .safetensors")
    return (f"{path}: cannot read checkpoint: the file is corrupt or truncated. It is {kind}; "
            f"it was read with {reader}, which failed with {failed}. Re-download it (an "
            "interrupted download or copy truncates it) or re-save it with "
            "torch.save(model.state_dict(), path)")


def _torch_load(path: str, allow_pickle: bool) -> object:
    """``torch.load(weights_only=True)``; retry with ``weights_only=False`` only when the
    file is readable but pickles a Python global (e.g. an ``argparse.Namespace`` or a
    whole ``nn.Module`` saved next to the weights) and the caller opted in with
    ``allow_pickle=True``. Without it the file is refused and nothing in it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED_GLOBAL.search(str(exc))
        if not found:
            raise CheckpointError(corrupt_message(path, exc, _READER)) from exc
        reason = f"it pickles the Python object {found.group(1)}"
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: refused to unpickle the file: {reason}, and unpickling it would run "
                "code stored in the file (torch.load(weights_only=True) refused it). If you "
                "trust the file, opt in with allow_pickle=True (command line: --allow-pickle); "
                "better, re-save it as a plain state dict or .safetensors") from exc
        logger.warning("%s: %s; unpickling it with weights_only=False because allow_pickle=True "
                       "(this runs code stored in the file)", path, reason)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise CheckpointError(corrupt_message(path, exc2, "torch.load(weights_only=False)")) from exc2
    except Exception as exc:  # corrupt / truncated / not a torch file
        raise CheckpointError(corrupt_message(path, exc, _READER)) from exc


def read_state_dict(path: str, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file and return the flat ``{name: tensor}`` state dict inside it.
    ``allow_pickle=True`` lets ``torch.load`` unpickle Python objects (trusted files only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            obj: object = load_file(path, device="cpu")
        except Exception as exc:
            raise CheckpointError(corrupt_message(path, exc, "safetensors.torch.load_file")) from exc
    else:
        obj = _torch_load(path, allow_pickle)
    return dict(_unwrap(obj, path))


def _unwrap(obj: object, path: str) -> Mapping[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in WRAPPER_KEYS:
        if key in obj:
            logger.debug("%s: using the state dict stored under %r", path, key)
            return _unwrap(obj[key], path)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path}: no state dict found; top-level keys are {sorted(map(str, obj))[:10]} "
            f"(looked for a bare state dict or one under {', '.join(WRAPPER_KEYS)})")
    return tensors


def strip_prefixes(state: Mapping[str, torch.Tensor], model_keys=()) -> Dict[str, torch.Tensor]:
    """Strip wrapper prefixes that every key carries (DDP ``module.``, ``_orig_mod.``).

    A prefix is kept when every key of the model itself carries it too.
    """
    state = dict(state)
    model_keys = list(model_keys)
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if model_keys and all(k.startswith(prefix) for k in model_keys):
                continue
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def compare_state_dicts(model_sd: Mapping[str, torch.Tensor], ckpt_sd: Mapping[str, torch.Tensor]
                        ) -> Tuple[List[str], List[str], List[Tuple[str, tuple, tuple]]]:
    """``(missing, unexpected, shape_mismatches)``; mismatches are ``(name, ckpt, model)``."""
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    mismatched = [(k, _shape(ckpt_sd[k]), _shape(v)) for k, v in model_sd.items()
                  if k in ckpt_sd and _shape(ckpt_sd[k]) != _shape(v)]
    return missing, unexpected, mismatched


def _first(names: List[str]) -> str:
    more = f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def mismatch_message(path: str, model: nn.Module, missing, unexpected, mismatched) -> str:
    """Human-readable description of how a checkpoint differs from a model."""
    lines = [f"checkpoint {path!r} does not match {type(model).__name__}:"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatch(es) (name: checkpoint vs model):")
        for name, ck, md in mismatched[:_SHOW]:
            lines.append(f"    {name}: checkpoint {list(ck)} vs model {list(md)}")
        if len(mismatched) > _SHOW:
            lines.append(f"    ... ({len(mismatched) - _SHOW} more)")
    lines.append("  Check the model name and its kwargs (num_classes, width, in_chans); "
                 "strict=False ignores missing/unexpected keys but not shape mismatches.")
    return "\n".join(lines)


def load_checkpoint(model: nn.Module, path: str, strict: bool = True,
                    allow_pickle: bool = False) -> nn.Module:
    """Load the weights in ``path`` into ``model`` in place and return ``model``.

    Raises :class:`~fxprune.errors.CheckpointError` when the file is missing or
    unreadable, when a tensor's shape differs, or (``strict=True``) when keys are
    missing or unexpected. A ``torch.load`` file that pickles Python objects is refused
    unless ``allow_pickle=True`` (then it is unpickled: only for files you trust).
    """
    model_sd = model.state_dict()
    state = strip_prefixes(read_state_dict(path, allow_pickle=allow_pickle), model_sd)
    missing, unexpected, mismatched = compare_state_dicts(model_sd, state)
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(mismatch_message(os.fspath(path), model, missing, unexpected, mismatched))
    if missing or unexpected:
        logger.warning("%s: %d missing and %d unexpected keys ignored (strict=False)",
                       path, len(missing), len(unexpected))
    model.load_state_dict(state, strict=False)
    return model
