"""``fxprune prune hf:PATH``: calibration tokens and the output folder.

Loading the folder and telling its input size live in :mod:`.common` (``load_model``,
``resolve_input_size``), where every command builds its model. Here:
:func:`synthetic_tokens` makes seeded calibration batches of token ids with the targets
the model's own loss expects; :func:`write_hf_out` writes ``--out DIR`` with
:func:`fxprune.save_pretrained`, which ``AutoModel*.from_pretrained(DIR)`` loads.
"""
from __future__ import annotations

import logging
from typing import List, Tuple

from .common import CliError

__all__ = ["synthetic_tokens", "write_hf_out"]

log = logging.getLogger(__name__)


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
