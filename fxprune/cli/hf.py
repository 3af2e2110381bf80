"""``fxprune prune hf:PATH``: a local Hugging Face model folder in, a folder out.

:func:`load_hf` builds the folder's architecture (``config.architectures[0]``, else
``AutoModel``) with ``from_pretrained`` on the local files only (no hub access);
:func:`hf_input_size` gives its input size (``(seq_len,)`` token ids for text models,
``(C, H, W)`` for vision models); :func:`synthetic_tokens` makes seeded calibration
batches of token ids with the targets the model's own loss expects; :func:`write_hf_out`
writes ``--out DIR`` with :func:`fxprune.save_pretrained`, which
``AutoModel*.from_pretrained(DIR)`` loads.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple

from .common import CliError

__all__ = ["HF_PREFIX", "is_hf", "load_hf", "hf_input_size", "is_text_model",
           "synthetic_tokens", "write_hf_out", "DEFAULT_SEQ_LEN"]

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
#: token ids per calibration sequence when ``--input-size`` is not given
DEFAULT_SEQ_LEN = 32


def is_hf(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)


def load_hf(spec: str, checkpoint: Optional[str]):
    """The model in the local folder ``spec[3:]``, in eval mode."""
    path = spec[len(HF_PREFIX):]
    if checkpoint:
        raise CliError("--checkpoint does not apply to hf:PATH: the folder holds the weights")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"{spec}: no config.json in {path!r}; hf:PATH takes a local Hugging "
                       "Face model folder (one written by save_pretrained); the hub is not "
                       "reached")
    try:
        import transformers
    except ImportError:
        raise CliError("hf:PATH needs transformers: pip install 'fxprune[hf]' "
                       "(or pip install transformers)") from None
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModel
    log.info("loading %s from %s", getattr(cls, "__name__", cls), path)
    return cls.from_pretrained(path, local_files_only=True).eval()


def is_text_model(model) -> bool:
    """A Hugging Face model that takes token ids (its config has a vocabulary and no
    image size)."""
    config = getattr(model, "config", None)
    return (config is not None and getattr(config, "vocab_size", None) is not None
            and getattr(config, "image_size", None) is None)


def hf_input_size(model, given: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    if given is not None:
        return tuple(given)
    config = model.config
    if is_text_model(model):
        return (DEFAULT_SEQ_LEN,)
    size = getattr(config, "image_size", None)
    if size is None:
        raise CliError("cannot tell this Hugging Face model's input size: pass --input-size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (getattr(config, "num_channels", 3), h, w)


def synthetic_tokens(model, size: Tuple[int, ...], device, count: int, batch_size: int,
                     seed: int, labels: bool) -> List[tuple]:
    """Seeded uniform token ids ``[batch, seq]``. Targets: the ids themselves for a causal
    LM (its loss shifts them: next-token prediction), else the dense model's prediction
    (argmax of the logits' last dim)."""
    import torch
    from ..passes.model_loss import is_causal_lm
    if len(size) != 1:
        raise CliError(f"a text model takes --input-size SEQ_LEN (one number), not {size}")
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch_size, size[0]), generator=gen)
        target = torch.zeros(batch_size, dtype=torch.long)
        if labels and is_causal_lm(model):
            target = ids.clone()
        elif labels:
            with torch.no_grad():
                target = model(ids.to(device)).logits.argmax(-1).cpu()
        out.append((ids, target))
    return out


def write_hf_out(result, model, path: str) -> str:
    """``--out DIR`` of an ``hf:`` model: a Hugging Face folder (config.json +
    model.safetensors)."""
    from ..api_hf import save_pretrained
    save_pretrained(result, model, path)
    return f"Hugging Face folder {path} (AutoModel*.from_pretrained loads it)"
