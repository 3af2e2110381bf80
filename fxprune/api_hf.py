"""Native Hugging Face output (issue 13, item 5): a slim model as a folder that
``AutoModel*.from_pretrained`` loads, so users keep ``generate()`` and their stack.

:func:`save_pretrained` reads the slim model's weights (a :class:`CompileResult`, or a
slim module, whose parameter names are the Hugging Face model's qualified names: the
export front end keeps them), infers the new sizes of the model's config from the
weights' shapes through :data:`SIZE_RULES`, builds the same Hugging Face class from that
config, loads the slim weights into it *strictly* (every tensor's shape must match what
the config builds: no silent truncation, no missing tensor) and writes the folder with
the class's own ``save_pretrained`` (``config.json`` + ``model.safetensors``).

A config holds one size per kind for all layers, so every layer must keep the same
number of heads, key-value heads and MLP units: prune with a ``sparsity=r`` budget, or
``compile(..., uniform=True)``. What a config cannot express is refused with the
reason: fewer heads in a BERT-style model whose head size is ``hidden_size /
num_attention_heads``, a layer that keeps other sizes than the others.

Contract: reads the slim weights and the original model's config and class; writes only
``folder``; neither model is changed.
"""
from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import FxpruneError

__all__ = ["SizeRule", "SIZE_RULES", "hf_config_sizes", "save_pretrained"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizeRule:
    """One config attribute read from weight shapes: the size of dim ``dim`` of every
    parameter whose name matches ``pattern`` (a regular expression, searched), divided
    by the config attribute ``per`` (e.g. ``head_dim``) when given. All matches must
    agree (one size for every layer)."""

    attribute: str
    pattern: str
    dim: int
    per: Optional[str] = None


#: Config sizes by the weights that carry them, for the families fxprune tests
#: (Llama / Qwen2 / Mistral-style decoders, BERT, ViT, GPT-2's MLP and stream). A rule applies when its
#: pattern matches some weight of the model.
SIZE_RULES: Tuple[SizeRule, ...] = (
    SizeRule("hidden_size", r"(^|\.)embed_tokens\.weight$", 1),
    SizeRule("hidden_size", r"(^|\.)embeddings\.word_embeddings\.weight$", 1),
    SizeRule("hidden_size", r"(^|\.)embeddings\.patch_embeddings\.projection\.weight$", 0),
    SizeRule("intermediate_size", r"\.mlp\.(gate_proj|fc1)\.weight$", 0),
    SizeRule("intermediate_size", r"\.intermediate\.dense\.weight$", 0),
    SizeRule("hidden_size", r"(^|\.)wte\.weight$", 1),                 # GPT-2: n_embd
    SizeRule("n_inner", r"\.mlp\.c_fc\.weight$", 0),                   # GPT-2 (as nn.Linear)
    SizeRule("num_attention_heads", r"\.(self_attn|attention)\.q_proj\.weight$", 0,
             per="head_dim"),
    SizeRule("num_key_value_heads", r"\.(self_attn|attention)\.k_proj\.weight$", 0,
             per="head_dim"),
    SizeRule("num_attention_heads", r"\.attention\.(self|attention)\.query\.weight$", 0,
             per="head_dim"),
)


def _head_dim(config) -> int:
    """The dense model's head size: ``config.head_dim`` where the family has one, else
    ``hidden_size // num_attention_heads`` (BERT, older ViT)."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def hf_config_sizes(config, shapes: Dict[str, torch.Size]) -> Dict[str, int]:
    """The config sizes that the slim weights' ``shapes`` imply (only attributes the
    config has). Raises :class:`FxpruneError` when the layers disagree."""
    base = {"head_dim": _head_dim(config)}
    found: Dict[str, Dict[int, List[str]]] = {}
    for rule in SIZE_RULES:
        if not hasattr(config, rule.attribute):
            continue
        for name, shape in shapes.items():
            if re.search(rule.pattern, name):
                size = int(shape[rule.dim])
                if rule.per is not None:
                    size, rest = divmod(size, base[rule.per])
                    if rest:
                        raise FxpruneError(
                            f"`{name}` keeps {shape[rule.dim]} rows, not a multiple of the "
                            f"head size {base[rule.per]}: cannot express it as heads")
                found.setdefault(rule.attribute, {}).setdefault(size, []).append(name)
    out = {}
    for attribute, by_size in found.items():
        if len(by_size) > 1:
            seen = ", ".join(f"{n} in {len(names)} ({names[0]}, ...)"
                             for n, names in sorted(by_size.items()))
            raise FxpruneError(
                f"the layers keep different {attribute}: {seen}; a Hugging Face config "
                "holds one size for all layers. Prune with a sparsity=r budget or "
                "compile(..., uniform=True), or ship the slim model with save_slim / "
                "--export instead")
        out[attribute] = next(iter(by_size))
    return out


def _new_config(model: nn.Module, shapes: Dict[str, torch.Size]):
    config = copy.deepcopy(model.config)
    sizes = hf_config_sizes(config, shapes)
    head_dim = _head_dim(config)
    implicit_head = not getattr(config, "head_dim", None)
    for attribute, size in sizes.items():
        if getattr(config, attribute) != size:
            log.info("config.%s: %s -> %s", attribute, getattr(config, attribute), size)
        setattr(config, attribute, size)
    if implicit_head and config.hidden_size // config.num_attention_heads != head_dim:
        if not _takes_head_dim(model):
            raise FxpruneError(
                f"{type(model).__name__} sizes its heads as hidden_size / "
                f"num_attention_heads, so its config cannot hold {config.num_attention_heads}"
                f" heads of size {head_dim} with hidden_size {config.hidden_size}: keep "
                "the heads and the residual stream whole (ignore= the attention groups "
                "and the stream group) or ship the slim model with save_slim / --export")
        config.head_dim = head_dim
    _validate(model, config)
    return config


def _validate(model: nn.Module, config) -> None:
    """The config's own checks (transformers 5 validates on save): a refusal becomes an
    :class:`FxpruneError` with the likely fix, before anything is written."""
    check = getattr(config, "validate", None)
    if not callable(check):
        return
    try:
        check()
    except Exception as exc:  # the library's validation error types vary by version
        reason = " ".join(str(exc).split())
        raise FxpruneError(
            f"{type(model).__name__}'s config refuses the slim sizes: {reason}. If the hidden "
            "size must be a multiple of the head count, prune with round_to= a multiple of "
            "the head count (e.g. round_to=8), or keep the residual stream with ignore=[its "
            "group]") from None


def _takes_head_dim(model: nn.Module) -> bool:
    """Whether the model's family reads an explicit ``config.head_dim`` (e.g. ViT in
    transformers 5), judged from its modeling source."""
    import inspect
    try:
        source = inspect.getsource(inspect.getmodule(type(model)))
    except (OSError, TypeError):
        return False
    return 'getattr(config, "head_dim"' in source or "config.head_dim" in source


def save_pretrained(slim, model: nn.Module, folder: str) -> str:
    """Write ``slim`` (a :class:`~fxprune.report.CompileResult` or its ``module``) as a
    Hugging Face folder for ``model``'s class; returns ``folder``. See the module doc."""
    module = getattr(slim, "module", slim)
    if not hasattr(model, "config") or not hasattr(type(model), "from_pretrained"):
        raise FxpruneError(f"save_pretrained needs the dense Hugging Face model (a "
                           f"PreTrainedModel with a config), not {type(model).__name__}")
    state = {k: v.detach() for k, v in module.state_dict().items()}
    config = _new_config(model, {k: v.shape for k, v in state.items()})
    with torch.device("meta"):
        target = type(model)(config)
    _to_conv1d_layout(target, state)
    wanted = {k: v.shape for k, v in target.state_dict().items()}
    _check_shapes(wanted, state)
    target = target.to_empty(device="cpu").to(next(iter(state.values())).dtype)
    missing = [k for k in wanted if k not in state and not _tied(target, k)]
    if missing:
        raise FxpruneError(f"the slim model has no weights for {missing[:3]} of "
                           f"{type(model).__name__}: it is not a slim copy of this model")
    target.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
    _restore_buffers(target, model)
    target.tie_weights()
    os.makedirs(folder, exist_ok=True)
    target.eval().save_pretrained(folder)
    log.info("wrote %s (config.json, model.safetensors)", folder)
    return folder


def _to_conv1d_layout(target: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """The slim model holds Hugging Face ``Conv1D`` layers (GPT-2) as ``nn.Linear``, whose
    weight is the transpose: give those weights back the ``[in, out]`` layout."""
    from transformers.pytorch_utils import Conv1D
    for name, mod in target.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(mod, Conv1D) and key in state:
            state[key] = state[key].t().contiguous()


def _check_shapes(wanted: Dict[str, torch.Size], state: Dict[str, torch.Tensor]) -> None:
    bad = [(k, tuple(shape), tuple(state[k].shape)) for k, shape in wanted.items()
           if k in state and shape != state[k].shape]
    if bad:
        k, want, got = bad[0]
        raise FxpruneError(f"the new config builds `{k}` as {want} but the slim model has "
                           f"{got} ({len(bad)} such tensors): its sizes are not expressible "
                           "in this config; ship the slim model with save_slim / --export")


def _tied(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is a tied copy (e.g. ``lm_head.weight`` tied to the embedding)."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    names = keys.keys() if isinstance(keys, dict) else keys
    return any(re.fullmatch(str(n).replace(".", r"\.").replace("*", ".*"), key) or n == key
               for n in names)


def _restore_buffers(target: nn.Module, model: nn.Module) -> None:
    """Non-persistent buffers (rotary ``inv_freq``, position ids) are not in any state
    dict: ``to_empty`` left them uninitialised, so copy the dense model's (their sizes do
    not depend on pruned widths; a differing one is recomputed by the class)."""
    dense = dict(model.named_buffers())
    for name, buf in target.named_buffers():
        src = dense.get(name)
        if src is not None and src.shape == buf.shape:
            buf.copy_(src)
