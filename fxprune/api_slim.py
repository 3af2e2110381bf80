"""API: reload a slim model shipped without pickle (:func:`load_slim`).

The file format (safetensors weights plus the plan JSON, :func:`fxprune.save_slim`) is
the data model's (:mod:`fxprune.slim_io`); rebuilding the slim model replays the plan on
the user's own model definition (:func:`fxprune.apply_plan`).
"""
from __future__ import annotations

from typing import Any, Union

import torch

from .api_prune import apply_plan
from .errors import CheckpointError
from .models.checkpoint import compare_state_dicts, mismatch_message
from .plan import Plan
from .slim_io import read_slim_metadata, slim_plan, slim_state

__all__ = ["load_slim"]


def load_slim(model: torch.nn.Module, plan: Union[Plan, str, None], weights_path: str,
              example_inputs: Any = None, *, verify: bool = True, leaf_modules=(),
              concrete_args=None) -> torch.fx.GraphModule:
    """Rebuild a slim model saved with :func:`~fxprune.save_slim` on ``model`` (a fresh
    instance of the definition the plan was made on) and load its weights; nothing is
    unpickled.

    ``plan``: a :class:`Plan`, a plan JSON path, or ``None`` for the plan embedded in
    the weights file. ``example_inputs`` default to inputs rebuilt from the plan's
    record (as :func:`~fxprune.apply_plan` rebuilds them: token ids too).
    ``verify`` checks the rewrite on ``model``'s own weights before the slim weights are
    loaded. Returns the slim GraphModule in eval mode. Raises :class:`CheckpointError`
    when the weights do not fit the rebuilt model (another plan's weights)."""
    meta = read_slim_metadata(weights_path)
    plan = slim_plan(weights_path, plan, meta)
    slim = apply_plan(model, plan, example_inputs, verify=verify, leaf_modules=leaf_modules,
                      concrete_args=concrete_args).module
    state = slim_state(weights_path, meta)
    missing, unexpected, mismatched = compare_state_dicts(slim.state_dict(), state)
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_message(weights_path, slim, missing, unexpected,
                                               mismatched)
                              + "\n  Is this the plan these weights were saved with?")
    slim.load_state_dict(state, strict=True)
    return slim.eval()
