"""Front end: keyword inputs (Hugging Face batches) as the graph's positional inputs.

Contract: :func:`keyword_inputs` turns a dict of keyword inputs (``input_ids``,
``attention_mask``, ``pixel_values``, a ``BatchEncoding``...) into a
:class:`KeywordInputs`: a tuple of the dict's tensors in the order of the forward's
parameters, which remembers their names (``.names``) and the non-tensor values
(``.constants``: ``output_hidden_states=True`` and the like; ``None`` values are dropped).
Every graph fxprune captures from such inputs takes the tensors positionally in that
order, and its placeholders carry the names, so the slim GraphModule takes them as
keywords too (``slim(**batch)``). Every later pass (shapes, counts, scoring, verification,
repair) sees a plain tuple. Nothing here mutates the model or the inputs.

``labels`` (:data:`LABELS`) is never a model input: in a calibration batch it is the
batch's targets (:func:`split_batch`), and an example input's ``labels`` is dropped. So the
captured graph computes the model's outputs, not its loss; the loss is computed outside
the graph (:mod:`.model_loss`) and the verification compares outputs only.

The KV cache: a forward that takes ``use_cache`` is captured with ``use_cache=False``
bound (:func:`export_call`), as are the constants, so a decoder whose output would hold a
``Cache`` object (which ``torch.export`` cannot return) captures as a plain function of the
input tensors; the slim model returns no ``past_key_values``.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import DataError, FxpruneError

__all__ = ["LABELS", "KeywordInputs", "keyword_inputs", "split_batch", "align_batches",
           "export_call", "drop_keyword_check", "fits_fx", "check_fx_inputs"]

LABELS = "labels"


class KeywordInputs(tuple):
    """The tensors of a keyword-input dict, in forward-parameter order, with their names."""

    names: Tuple[str, ...]
    constants: Dict[str, Any]

    def __new__(cls, values: Sequence[Any], names: Sequence[str],
                constants: Optional[Dict[str, Any]] = None):
        self = super().__new__(cls, tuple(values))
        self.names, self.constants = tuple(names), dict(constants or {})
        return self

    def as_kwargs(self) -> Dict[str, Any]:
        """``{name: tensor}`` in graph-input order."""
        return dict(zip(self.names, self))

    def with_values(self, values: Sequence[Any]) -> "KeywordInputs":
        """The same names and constants with other tensors (e.g. cast to a dtype)."""
        return KeywordInputs(values, self.names, self.constants)


def _parameter_order(model: torch.nn.Module) -> List[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def keyword_inputs(model: torch.nn.Module, inputs: Any) -> Any:
    """``inputs`` as :class:`KeywordInputs` when it is a mapping (module docstring);
    anything else unchanged."""
    if not isinstance(inputs, Mapping) or isinstance(inputs, KeywordInputs):
        return inputs
    order = _parameter_order(model)
    rank = {n: i for i, n in enumerate(order)}
    items = [(k, v) for k, v in inputs.items() if k != LABELS and v is not None]
    tensors = [(k, v) for k, v in items if torch.is_tensor(v)]
    if not tensors:
        raise DataError(f"the keyword inputs {sorted(map(str, inputs))} hold no tensor a model "
                        "input can be made of: pass e.g. {'input_ids': ids} or "
                        "{'pixel_values': images}")
    extra = [k for k, _ in tensors if k not in rank]
    if extra and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in
                         inspect.signature(model.forward).parameters.values()):
        raise DataError(f"{type(model).__name__}.forward takes no keyword input "
                        f"{', '.join(map(repr, extra))} (its parameters: {', '.join(order)}); "
                        "drop those keys from the batch")
    tensors.sort(key=lambda kv: rank.get(kv[0], len(rank)))  # stable: extras keep order
    constants = {k: v for k, v in items if not torch.is_tensor(v)}
    return KeywordInputs([v for _, v in tensors], [k for k, _ in tensors], constants)


def split_batch(item: Mapping) -> Tuple[Dict[str, Any], Any]:
    """A dict calibration batch as ``(keyword inputs, targets)``: its ``labels`` are the
    targets (``None`` without them)."""
    inputs = {k: v for k, v in item.items() if k != LABELS}
    return inputs, item.get(LABELS)


def align_batches(model: torch.nn.Module, example: Any, batch_list) -> Any:
    """Turn the dict inputs of ``batch_list`` (in place) into :class:`KeywordInputs` named
    like ``example`` (the example inputs, or the first batch's when ``example`` is None);
    return the example. Without labels, a causal LM's targets are its ``input_ids`` (the
    padding, where ``attention_mask`` is 0, ignored as -100): the model's own loss then is
    the next-token cross-entropy (:mod:`.model_loss`)."""
    example = keyword_inputs(model, example)
    if not batch_list:
        return example
    for i, (inputs, targets) in enumerate(batch_list):
        inputs = keyword_inputs(model, inputs)
        if example is None:
            example = inputs
        if isinstance(inputs, KeywordInputs) != isinstance(example, KeywordInputs):
            raise DataError(f"calibration batch {i} and the example inputs differ in kind "
                            "(one is a dict of keyword inputs, the other positional "
                            "tensors): pass both as dicts, or both as tensors/tuples")
        if isinstance(inputs, KeywordInputs) and inputs.names != example.names:
            raise DataError(f"calibration batch {i} has the keyword inputs "
                            f"{list(inputs.names)}, the example inputs {list(example.names)}: "
                            "every batch needs the same keys (the graph takes them in order)")
        if targets is None and isinstance(inputs, KeywordInputs):
            targets = _next_token_targets(model, inputs)
        batch_list[i] = (inputs, targets)
    return example


def _next_token_targets(model, inputs: KeywordInputs):
    from .model_loss import is_causal_lm
    named = inputs.as_kwargs()
    ids = named.get("input_ids")
    if ids is None or not is_causal_lm(model):
        return None
    mask = named.get("attention_mask")
    return ids if mask is None else ids.masked_fill(mask == 0, -100)


def export_call(module: torch.nn.Module, inputs: Any) -> Tuple[tuple, Dict[str, Any]]:
    """``(args, kwargs)`` to export ``module`` (a twin of the user's model: its ``forward``
    may be rebound) with: keyword inputs as kwargs, and the constants and
    ``use_cache=False`` (when the forward takes it) bound into ``forward``."""
    bound: Dict[str, Any] = dict(getattr(inputs, "constants", {}))
    params = _parameter_order(module)
    if "use_cache" in params:
        bound.setdefault("use_cache", False)
    if bound:
        module.forward = functools.partial(type(module).forward, module, **bound)
    if isinstance(inputs, KeywordInputs):
        return (), inputs.as_kwargs()
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}


def drop_keyword_check(gm: torch.nn.Module, inputs: Any) -> None:
    """Remove the input check ``ep.module()`` hooks onto a program exported with keyword
    inputs: it refuses positional calls ("kwarg keyword mismatch"), and every pass calls
    the graph positionally (its plain code generation takes the inputs by position or by
    name alike; the graph's own guards stay)."""
    if not isinstance(inputs, KeywordInputs):
        return
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
            gm._forward_pre_hooks_with_kwargs.pop(key, None)


def fits_fx(model: torch.nn.Module, inputs: Any) -> bool:
    """Whether symbolic tracing, which passes inputs positionally, can take ``inputs``:
    not keyword inputs, or keyword inputs that are the forward's leading parameters
    without constants."""
    if not isinstance(inputs, KeywordInputs):
        return True
    lead = _parameter_order(model)[:len(inputs.names)]
    return list(inputs.names) == lead and not inputs.constants


def check_fx_inputs(model: torch.nn.Module, inputs: Any) -> None:
    """Raise, saying what to do, unless :func:`fits_fx`."""
    if not fits_fx(model, inputs):
        lead = _parameter_order(model)[:len(inputs.names)]
        raise FxpruneError(
            f"the FX front end passes inputs positionally, and the keyword inputs "
            f"{list(inputs.names)}{' with constants ' + str(sorted(inputs.constants)) if inputs.constants else ''} "
            f"are not {type(model).__name__}.forward's leading parameters {lead}: use "
            "frontend='export' (it captures with keyword inputs) or pass a tuple of tensors")
