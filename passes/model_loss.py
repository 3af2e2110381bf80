"""Scoring: the default loss of a model whose output is a ``ModelOutput`` / dict of logits.

Contract: :func:`default_model_loss` returns ``loss(outputs, targets)`` for the data
criteria when the user passes neither ``loss_fn`` nor ``output_fn``. It reads only the
user model's class, ``config`` and ``loss_function`` (never its weights: the outputs come
from the scoring copy of the graph):

* a tensor output keeps fxprune's default, mean cross-entropy against the targets;
* a Hugging Face model's (a ``PreTrainedModel``'s) mapping output (``ModelOutput``, dict)
  is read for its ``logits`` (other models' dict, tuple or dataclass outputs still need
  ``output_fn``, as their logits cannot be told from other outputs); with targets (the
  batch's ``labels``) a Hugging Face model's own loss function is applied, called as the
  model's ``forward`` calls it for its head (:data:`HF_LOSSES`: causal LM = next-token
  cross-entropy with ``-100`` ignored, masked LM / token classification = per-token
  cross-entropy, sequence / image classification = cross-entropy, MSE or BCE by
  ``config.problem_type``), so the value equals ``model(**batch, labels=labels).loss``;
  other heads with 2-D ``logits`` take the mean cross-entropy;
* without targets (a dict batch without ``labels`` that is not a causal LM's -- those get
  their ``input_ids`` as targets, :func:`.keyword_inputs.align_batches`): cross-entropy
  against the model's own prediction (the detached argmax of every row of logits).

A mapping without ``logits``, or a head whose loss is not in the table, raises
:class:`~fxprune.errors.DataError` saying to pass ``loss_fn`` / ``output_fn``.
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..criteria.scoring import default_loss
from ..errors import DataError

__all__ = ["HF_LOSSES", "default_model_loss", "hf_loss_type", "is_causal_lm", "self_label_loss"]


def _causal(model, logits, labels):
    return model.loss_function(logits=logits, labels=labels,
                               vocab_size=logits.shape[-1])


def _classification(model, logits, labels):  # config copied: the loss sets problem_type
    return model.loss_function(labels, logits, copy.copy(model.config))


def _token(model, logits, labels):
    return model.loss_function(logits, labels, model.config)


#: Hugging Face ``loss_type`` -> how the head's forward calls ``self.loss_function``.
HF_LOSSES = {
    "ForCausalLM": _causal, "ForConditionalGeneration": _causal, "ForMaskedLM": _causal,
    "ForSequenceClassification": _classification, "ForImageClassification": _classification,
    "ForAudioClassification": _classification, "ForVideoClassification": _classification,
    "ForTokenClassification": _token,
}


#: Heads whose class name does not end in their loss type (GPT-2's ``GPT2LMHeadModel``,
#: whose ``loss_type`` is None although its forward computes the causal-LM loss):
#: transformers' auto mapping of that head lists them.
_AUTO_HEADS = {"ForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"}


def hf_loss_type(model: Optional[torch.nn.Module]) -> Optional[str]:
    """A Hugging Face model's ``loss_type``; for a head whose name does not say it, the
    type of the auto mapping that lists its class (:data:`_AUTO_HEADS`); else None."""
    loss_type = getattr(model, "loss_type", None) if model is not None else None
    if loss_type is not None or not _is_hf(model):
        return loss_type
    from transformers.models.auto import modeling_auto
    name = type(model).__name__
    for head, mapping in _AUTO_HEADS.items():
        for classes in getattr(modeling_auto, mapping, {}).values():
            if name == classes or (isinstance(classes, (tuple, list)) and name in classes):
                return head
    return None


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A Hugging Face causal LM (its loss shifts the labels by one token)."""
    return hf_loss_type(model) in ("ForCausalLM", "ForConditionalGeneration")


def self_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every row of ``logits`` against its own detached argmax."""
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, flat.detach().argmax(-1))


def default_model_loss(model: Optional[torch.nn.Module]) -> Callable[[Any, Any], torch.Tensor]:
    """The default ``loss(outputs, targets)`` for ``model`` (module docstring)."""
    loss_type = hf_loss_type(model)
    head, hf = HF_LOSSES.get(loss_type), _is_hf(model)

    def loss(outputs, targets):
        if torch.is_tensor(outputs):
            return self_label_loss(outputs) if targets is None else default_loss(outputs, targets)
        logits = _logits(outputs, hf)
        if targets is None:
            return self_label_loss(logits)
        if head is not None:
            return head(model, logits, targets)
        if loss_type is not None and hasattr(model, "loss_function"):
            raise DataError(f"{type(model).__name__}'s loss ({loss_type}) is not one fxprune "
                            "can call from the outputs: pass loss_fn(outputs, labels)")
        if logits.dim() != 2:
            raise DataError(f"the model's logits have shape {list(logits.shape)}, not "
                            "[batch, classes], and it is not a Hugging Face head with a known "
                            "loss: pass loss_fn(outputs, targets)")
        return default_loss(logits, targets)

    return loss


def _is_hf(model) -> bool:
    transformers = sys.modules.get("transformers")  # never imported here
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _logits(outputs, hf: bool) -> torch.Tensor:
    if hf and isinstance(outputs, Mapping) and torch.is_tensor(outputs.get("logits")):
        return outputs["logits"]
    raise DataError(
        f"the model returns {_describe(outputs)}, not logits, so the default loss "
        "(cross-entropy) cannot be computed: pass output_fn= to pick the logits (e.g. "
        "output_fn=lambda out: out['logits'], out[0] or out.logits), or a "
        "loss_fn(outputs, targets) that takes the whole output")


def _describe(outputs) -> str:
    if isinstance(outputs, Mapping):
        return f"a {type(outputs).__name__} with keys {sorted(map(str, outputs))}"
    if isinstance(outputs, (tuple, list)):
        return f"a {type(outputs).__name__} of {len(outputs)}"
    return f"a {type(outputs).__name__}"
