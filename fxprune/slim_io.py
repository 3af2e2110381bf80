"""Shipping a slim model without pickle: weights as ``.safetensors`` plus the plan JSON.

A ``torch.save``d slim GraphModule can only be read with ``torch.load(weights_only=False)``,
which runs whatever code the file pickles. :func:`save_slim` writes the slim model's
weights as a safetensors file (tensors only, nothing runs on load) and its plan as JSON
(also embedded in the safetensors metadata); :func:`slim_plan` and :func:`slim_state`
read them back. The data model only: :func:`fxprune.load_slim` (``api_slim.py``) rebuilds
the slim model from the user's own model definition with :func:`fxprune.apply_plan` and
loads the weights into it. ``torch.export`` programs (``.pt2``) are the deployable
alternative.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .errors import CheckpointError
from .plan import Plan, write_atomic

log = logging.getLogger(__name__)

FORMAT = "fxprune-slim/1"
_PLAN_KEY, _ALIAS_KEY, _FORMAT_KEY = "fxprune.plan", "fxprune.aliases", "format"


def default_plan_path(weights_path: str) -> str:
    """``slim.safetensors`` -> ``slim.plan.json``."""
    stem = weights_path[:-len(".safetensors")] if weights_path.endswith(".safetensors") \
        else weights_path
    return stem + ".plan.json"


def _tensors(module: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The state dict as fresh contiguous CPU tensors, tied entries stored once:
    ``(tensors, {alias: stored name})``."""
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    first: Dict[int, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def save_slim(result: Any, weights_path: str, plan_path: Optional[str] = None,
              plan: Optional[Plan] = None) -> Tuple[str, str]:
    """Write a slim model's weights to ``weights_path`` (``.safetensors``) and its plan
    to ``plan_path`` (default ``NAME.plan.json``); return both paths.

    ``result`` is a :class:`~fxprune.CompileResult` (its ``module`` and ``plan``) or a
    slim module with ``plan=`` given. Both files are written atomically. Reload with
    :func:`fxprune.load_slim` on the model definition the plan was made on."""
    from safetensors.torch import save
    module = getattr(result, "module", result)
    plan = plan if plan is not None else getattr(result, "plan", None)
    if not isinstance(module, torch.nn.Module) or not isinstance(plan, Plan):
        raise CheckpointError("save_slim(result, path): pass a CompileResult, or the slim "
                              "module and plan=its Plan")
    if not weights_path.endswith(".safetensors"):
        raise CheckpointError(f"{weights_path}: the weights file must end in .safetensors")
    plan_path = plan_path or default_plan_path(weights_path)
    tensors, aliases = _tensors(module)
    text = plan.to_json()
    meta = {_FORMAT_KEY: FORMAT, _PLAN_KEY: text, _ALIAS_KEY: json.dumps(aliases)}
    write_atomic(weights_path, save(tensors, metadata=meta))
    write_atomic(plan_path, text)
    log.info("wrote %s (%d tensors) and %s", weights_path, len(tensors), plan_path)
    return weights_path, plan_path


def read_slim_metadata(weights_path: str) -> Dict[str, str]:
    """The safetensors metadata of a file written by :func:`save_slim` (no pickle)."""
    from safetensors import safe_open
    if not os.path.isfile(weights_path):
        raise CheckpointError(f"weights file {weights_path!r} does not exist")
    try:
        with safe_open(weights_path, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise CheckpointError(f"{weights_path}: cannot read safetensors file: {exc}") from exc


def slim_plan(weights_path: str, plan: Union[Plan, str, None],
              meta: Dict[str, str]) -> Plan:
    """The plan of a slim weights file: ``plan`` itself, read from a plan JSON path, or
    (``None``) the plan embedded in the file's metadata ``meta``."""
    if plan is None:
        if _PLAN_KEY not in meta:
            raise CheckpointError(f"{weights_path}: no plan is embedded in this file; pass "
                                  "the plan JSON written next to it")
        return Plan.from_json(meta[_PLAN_KEY])
    return plan if isinstance(plan, Plan) else Plan.from_json(os.fspath(plan))


def slim_state(weights_path: str, meta: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """The state dict stored by :func:`save_slim` (CPU tensors, no pickle), tied entries
    restored under every name they were saved under (from ``meta``'s aliases)."""
    from safetensors.torch import load_file
    state = load_file(weights_path, device="cpu")
    for alias, name in json.loads(meta.get(_ALIAS_KEY, "{}")).items():
        if name in state:
            state[alias] = state[name]
    return state
