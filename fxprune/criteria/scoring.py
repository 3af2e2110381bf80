"""Shared infrastructure of the data-driven criteria (OBA, OBA-exact, SOSP, Taylor...).

Every data-driven criterion scores a *scoring copy* of the user's model
(:func:`make_scoring_copy`): a deep copy in ``eval()`` mode (BatchNorm uses its running
statistics and never updates them), in float32 or float64, with every floating parameter
requiring grad and, for a :class:`torch.fx.GraphModule`, with fused attention
(``scaled_dot_product_attention``) lowered to explicit FX nodes -- fused kernels support
neither forward-mode AD nor double backward (design §5).

Calibration data goes through :func:`as_batches` / :func:`cast_batch`; per-batch
statistics are summed, :func:`all_reduce_sums` adds the sums of all data-parallel ranks
(design §8), and the caller divides by the global batch count.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import operator
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DataError

log = logging.getLogger(__name__)

Batch = Tuple[Tuple[Tensor, ...], Any]

#: Call targets of fused attention that :func:`lower_sdpa` rewrites.
SDPA_TARGETS = (F.scaled_dot_product_attention,)


# ----------------------------------------------------------------------------- copies
def make_scoring_copy(model: nn.Module) -> nn.Module:
    """Return a scoring copy of ``model``; ``model`` itself is left bit-identical.

    The copy is a deep copy in ``eval()`` mode; float16/bfloat16 parameters and buffers
    become float32 (float32 and float64 stay as they are); every floating parameter
    has ``requires_grad=True``. A :class:`torch.fx.GraphModule` additionally gets its
    ``scaled_dot_product_attention`` calls rewritten into math form (:func:`lower_sdpa`).
    A plain ``nn.Module`` is not traced here: criteria that walk the graph (OBA) need the
    caller to trace it first (``torch.fx.symbolic_trace``) and pass the GraphModule.
    """
    scoring = copy.deepcopy(model)
    scoring.eval()
    low = (torch.float16, torch.bfloat16)
    scoring._apply(lambda t: t.float() if t.is_floating_point() and t.dtype in low else t)
    for p in scoring.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    if isinstance(scoring, torch.fx.GraphModule):
        lower_sdpa(scoring)
    else:
        log.debug("make_scoring_copy: %s is not a GraphModule; trace it before running "
                  "graph-based criteria (OBA)", type(model).__name__)
    return scoring


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


# ----------------------------------------------------------------------------- data
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


def as_batches(data: Iterable, batches: Optional[int] = None) -> List[Batch]:
    """Materialise calibration data as a list of ``(inputs_tuple, targets)``.

    ``data`` is an iterable of ``(inputs, targets)`` pairs (a ``DataLoader`` works);
    ``inputs`` is a tensor or a tuple/list of tensors. At most ``batches`` batches are
    taken (all when ``None``). Raises :class:`DataError` when no batch comes out or a
    batch is not an ``(inputs, targets)`` pair.
    """
    if data is None:
        raise DataError("this criterion needs calibration data: pass data=<iterable of "
                        "(inputs, targets) batches>, e.g. a DataLoader")
    if batches is not None and batches < 1:
        raise DataError(f"batches={batches}: ask for at least one calibration batch")
    out: List[Batch] = []
    for i, item in enumerate(data):
        if batches is not None and len(out) >= batches:
            break
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"calibration batch {i} is a {type(item).__name__}, expected "
                            "an (inputs, targets) pair")
        inputs, targets = item
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        out.append((inputs, targets))
    if not out:
        raise DataError("the calibration data is empty: data-driven criteria need at "
                        "least one (inputs, targets) batch")
    return out


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``outputs`` (logits) against ``targets``."""
    return F.cross_entropy(outputs, targets)


def module_device_dtype(module: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Device and floating dtype of ``module``'s first floating parameter or buffer
    (cpu/float32 when it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def cast_batch(batch: Batch, module: nn.Module) -> Batch:
    """Move an ``(inputs, targets)`` batch to ``module``'s device; floating inputs and
    targets take the module's floating dtype (integer class labels keep theirs). Returns
    ``(inputs_tuple, targets)``; a single input tensor becomes a 1-tuple."""
    device, dtype = module_device_dtype(module)

    def cast(x):
        """Move/cast one input or target (recursing into tuples/lists)."""
        if isinstance(x, Tensor):
            return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        if isinstance(x, (tuple, list)):
            return type(x)(cast(y) for y in x)
        return x

    inputs, targets = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(cast(x) for x in inputs), cast(targets)


def check_finite(value: Union[Tensor, float], what: str, batch_index: int) -> None:
    """Raise :class:`DataError` naming ``what`` and the batch when ``value`` has NaN/inf."""
    ok = (bool(torch.isfinite(value).all()) if isinstance(value, Tensor)
          else math.isfinite(float(value)))
    if not ok:
        raise DataError(f"{what} is not finite (NaN or inf) on calibration batch "
                        f"{batch_index}: check that batch's inputs/targets and the "
                        "loss_fn; a diverged checkpoint also does this")


# ----------------------------------------------------------------------------- scale
def all_reduce_sums(sums: Dict[str, Tensor], count) -> Tuple[Dict[str, Tensor], Any]:
    """Sum per-rank statistics over all data-parallel ranks (no-op without a process group).

    When ``torch.distributed`` is initialised, every tensor of ``sums`` and the batch
    ``count`` are all-reduced (SUM) -- in place for the tensors -- so all ranks can divide
    by the same global count and return identical averages. All ranks must pass the same
    keys. Tensors are reduced one flat buffer per (device, dtype).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return sums, count
    keys = sorted(sums)
    buckets: Dict[Tuple[torch.device, torch.dtype], List[str]] = {}
    for k in keys:
        buckets.setdefault((sums[k].device, sums[k].dtype), []).append(k)
    count_device = torch.device("cpu")
    for (device, dtype), names in buckets.items():
        flat = torch.cat([sums[k].reshape(-1) for k in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for k in names:
            n = sums[k].numel()
            sums[k].copy_(flat[offset:offset + n].view_as(sums[k]))
            offset += n
        count_device = device
    if dist.get_backend() == "nccl":
        count_device = torch.device("cuda", torch.cuda.current_device())
    total = torch.tensor(float(count), dtype=torch.float64, device=count_device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    total = total.item()
    return sums, int(total) if float(total).is_integer() else total


def progress_iter(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` and stderr is a TTY."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    total = len(iterable) if hasattr(iterable, "__len__") else None
    return tqdm(iterable, desc=desc, total=total, leave=False)
