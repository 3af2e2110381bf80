"""Attention lowering for scoring (front end of the scoring stage, design §5).

Fused attention (``scaled_dot_product_attention``) supports neither forward-mode AD
(OBA) nor double backward (OBA-exact, SOSP). :func:`lower_sdpa` rewrites a graph's SDPA
calls into explicit math nodes, in place, on the *scoring copy* only (the user's model
and the analysed graph keep their fused calls); :func:`math_attention` forces the math
kernels for attention that leaf modules call internally.

Reads: a GraphModule. Writes: its graph (SDPA nodes replaced by q·kᵀ, scale, mask,
softmax, ·v nodes). Invariant: the lowered graph computes what the fused one computes
(without attention dropout: scoring is in eval mode).
"""
from __future__ import annotations

import contextlib
import logging
import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SDPA_TARGETS", "lower_sdpa", "math_attention", "sdpa_apply_mask", "sdpa_scale",
           "sdpa_repeat_kv"]

log = logging.getLogger(__name__)

#: Call targets of fused attention that :func:`lower_sdpa` rewrites.
SDPA_TARGETS = (F.scaled_dot_product_attention,)


def sdpa_apply_mask(scores: Tensor, attn_mask: Optional[Tensor] = None,
                    is_causal: bool = False) -> Tensor:
    """Apply an SDPA attention mask to ``scores`` (``[..., L, S]``), out of place.

    Boolean masks keep the ``True`` entries (the others become ``-inf``); floating masks
    are added; ``is_causal`` masks the strict upper triangle. Used by lowered graphs.
    """
    if is_causal:
        L, S = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return scores


def sdpa_scale(query: Tensor, scale: Optional[float] = None) -> float:
    """The softmax scale SDPA uses: ``scale`` or ``1/sqrt(head_dim)`` (a Python float)."""
    return float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])


def sdpa_repeat_kv(x: Tensor, query: Tensor, enable_gqa: bool = False) -> Tensor:
    """Grouped-query attention: repeat key/value heads to match the query's heads."""
    if not enable_gqa or x.shape[-3] == query.shape[-3]:
        return x
    return x.repeat_interleave(query.shape[-3] // x.shape[-3], dim=-3)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def lower_sdpa(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``scaled_dot_product_attention`` nodes of ``gm`` in place into math form.

    ``softmax(q @ kᵀ · scale (+ mask, causal)) @ v`` as separate FX nodes, so that
    forward-mode AD and double backward work and OBA sees the two attention products as
    bilinear nodes. Attention dropout is dropped (scoring is deterministic and in eval
    mode). Returns the number of rewritten nodes.
    """
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = dict(_SDPA_DEFAULTS)
        a.update(zip(_SDPA_ARGS, node.args))
        a.update(node.kwargs)
        if a["dropout_p"] not in (0, 0.0):
            log.info("lower_sdpa: %s: attention dropout is ignored while scoring", node)
        with graph.inserting_before(node):
            q, k, v = a["query"], a["key"], a["value"]
            if a["enable_gqa"] is not False:
                k = graph.call_function(sdpa_repeat_kv, (k, q, a["enable_gqa"]))
                v = graph.call_function(sdpa_repeat_kv, (v, q, a["enable_gqa"]))
            kt = graph.call_method("transpose", (k, -2, -1))
            scores = graph.call_function(operator.matmul, (q, kt))
            scale = graph.call_function(sdpa_scale, (q, a["scale"]))
            scores = graph.call_function(operator.mul, (scores, scale))
            if a["attn_mask"] is not None or a["is_causal"] is not False:
                scores = graph.call_function(sdpa_apply_mask,
                                             (scores, a["attn_mask"], a["is_causal"]))
            probs = graph.call_function(torch.softmax, (scores, -1))
            out = graph.call_function(operator.matmul, (probs, v))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
        log.debug("lower_sdpa: lowered %d scaled_dot_product_attention node(s)", count)
    return count



@contextlib.contextmanager
def math_attention():
    """Attention through its math kernels while scoring. ``lower_sdpa`` rewrites the
    graph's own ``scaled_dot_product_attention`` calls, but leaf modules call it (and
    ``nn.MultiheadAttention`` its fused fast path) internally. The fused kernels support
    neither forward-mode AD (OBA) nor double backward (OBA-exact, SOSP), so the math
    backend is forced and the MHA fast path switched off here; both settings are restored."""
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        except ImportError:  # torch < 2.3: no backend selection
            pass
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "set_fastpath_enabled"):
            was = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, was)
        yield
