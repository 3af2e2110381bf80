"""Shared infrastructure of the data-driven criteria (OBA, OBA-exact, SOSP, Taylor...).

Every data-driven criterion scores a *scoring copy* of the user's model
(:func:`make_scoring_copy`): a deep copy in ``eval()`` mode (BatchNorm uses its running
statistics and never updates them), in float32 or float64, with every floating parameter
requiring grad and, for a :class:`torch.fx.GraphModule`, with fused attention
(``scaled_dot_product_attention``) lowered to explicit FX nodes -- fused kernels support
neither forward-mode AD nor double backward (design §5).

Every data-driven criterion runs one calibration loop, :func:`calibrate`: calibration
batches (from :func:`fxprune.passes.score.prepare_batches`) go through :func:`cast_batch`
under a progress bar (:func:`progress_iter`); a criterion's per-batch step adds its
statistics into float64 sums (:func:`zero_sums`) and checks the batch's loss
(:func:`batch_loss`); :func:`all_reduce_sums` adds the sums of all data-parallel ranks
(design §8), and the caller divides by the global batch (or sample) count.

Option ``batch_chunk`` of OBA, OBA-exact and SOSP-H (:func:`over_sub_batches`) bounds
their memory: a batch is scored in sub-batches of at most that many samples, each with
its loss scaled by its share of the batch. In eval mode (no BatchNorm statistics) a
sample's outputs depend on that sample only, so when the loss is the batch mean of
per-sample losses every per-batch statistic (g, Hv, H̃v) is the share-weighted sum of
the sub-batches' and the scores are unchanged (up to rounding); the loss is checked to
be such a mean on every batch.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import CriterionError, DataError
from ..passes.lower_attention import lower_sdpa

log = logging.getLogger(__name__)

Batch = Tuple[Tuple[Tensor, ...], Any]


# ----------------------------------------------------------------------------- copies
def make_scoring_copy(model: nn.Module) -> nn.Module:
    """Return a scoring copy of ``model``; ``model`` itself is left bit-identical.

    The copy is a deep copy prepared by :func:`prepare_for_scoring`. A plain
    ``nn.Module`` is not traced here: criteria that walk the graph (OBA) need the caller
    to trace it first (``torch.fx.symbolic_trace``) and pass the GraphModule.
    """
    return prepare_for_scoring(copy.deepcopy(model))


def prepare_for_scoring(module: nn.Module) -> nn.Module:
    """Make ``module`` (one the caller owns, e.g. a fresh copy) a scoring module, in place:
    ``eval()`` mode; float16/bfloat16 parameters and buffers become float32 (float32 and
    float64 stay as they are); every floating parameter has ``requires_grad=True``; a
    :class:`torch.fx.GraphModule` gets its ``scaled_dot_product_attention`` calls
    rewritten into math form (:func:`lower_sdpa`). Returns ``module``."""
    module.eval()
    low = (torch.float16, torch.bfloat16)
    module._apply(lambda t: t.float() if t.is_floating_point() and t.dtype in low else t)
    for p in module.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    if isinstance(module, torch.fx.GraphModule):
        lower_sdpa(module)
    else:
        log.debug("prepare_for_scoring: %s is not a GraphModule; trace it before running "
                  "graph-based criteria (OBA)", type(module).__name__)
    return module


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


def batch_loss(loss_fn: Optional[Callable], outputs, targets, batch_index: int) -> Tensor:
    """``loss_fn(outputs, targets)`` (mean cross-entropy when ``loss_fn`` is None), the
    batch-mean loss of calibration batch ``batch_index``; :class:`DataError` naming the
    batch when it is not finite."""
    loss = (loss_fn or default_loss)(outputs, targets)
    check_finite(loss.detach(), "the loss", batch_index)
    return loss


# ----------------------------------------------------------------------------- sub-batches
def check_batch_chunk(value, desc: str) -> Optional[int]:
    """Option ``batch_chunk``: None (whole batches) or a positive int, else
    :class:`CriterionError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CriterionError(f"{desc}: batch_chunk={value!r} must be a positive number of "
                             "samples per sub-batch (or None for whole batches)")
    return value


def _batch_size(inputs: Tuple, targets) -> int:
    """The leading size shared by every tensor of ``inputs`` and ``targets``."""
    sizes = {t.shape[0] for t in tree_flatten((inputs, targets))[0]
             if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise CriterionError(f"batch_chunk needs inputs and targets that share their first "
                             f"(batch) dimension; got leading sizes {sorted(sizes)}: score "
                             "without batch_chunk")
    return sizes.pop()


def _rows(value, a: int, b: int):
    """Samples ``a:b`` of every tensor with a batch dimension in ``value``."""
    leaves, spec = tree_flatten(value)
    return tree_unflatten([t[a:b] if isinstance(t, Tensor) and t.dim() > 0 else t
                           for t in leaves], spec)


def over_sub_batches(inputs: Tuple, targets, loss_fn: Optional[Callable],
                     size: Optional[int], run: Callable, batch_index: int) -> None:
    """Call ``run(inputs_c, targets_c, loss_c)`` on every sub-batch of at most ``size``
    samples (once on the whole batch when ``size`` is None or not smaller than it), where
    ``loss_c(outputs, targets) = (n_c / n) · loss_fn(outputs, targets)``. Afterwards
    :class:`CriterionError` unless ``loss_fn`` on the whole batch's outputs equals the sum
    of the scaled sub-batch losses (a batch mean of per-sample losses), the condition
    under which sub-batch statistics add up to the batch's."""
    loss_fn = loss_fn or default_loss
    n = _batch_size(inputs, targets) if size is not None else 0
    if size is None or size >= n:
        run(inputs, targets, loss_fn)
        return
    seen: List[Tuple[Any, Tensor]] = []
    for a in range(0, n, size):
        share = (min(n, a + size) - a) / n

        def loss_c(outputs, tgt, share=share):
            loss = share * loss_fn(outputs, tgt)
            seen.append((_detached(outputs), loss.detach()))
            return loss
        run(_rows(inputs, a, a + size), _rows(targets, a, a + size), loss_c)
    _check_mean_loss(loss_fn, seen, targets, batch_index)


def _detached(value):
    """``value`` with every tensor detached."""
    leaves, spec = tree_flatten(value)
    return tree_unflatten([t.detach() if isinstance(t, Tensor) else t for t in leaves], spec)


def _check_mean_loss(loss_fn: Callable, seen, targets, batch_index: int) -> None:
    """The whole batch's loss (from the sub-batches' outputs) must equal the sum of the
    scaled sub-batch losses."""
    specs = [tree_flatten(out) for out, _ in seen]
    if not specs or any(spec != specs[0][1] for _, spec in specs):
        return
    columns = list(zip(*(leaves for leaves, _ in specs)))
    if not all(isinstance(t, Tensor) and t.dim() > 0 for col in columns for t in col):
        log.debug("batch_chunk: outputs are not all batched tensors; loss check skipped")
        return
    whole = tree_unflatten([torch.cat(col) for col in columns], specs[0][1])
    with torch.no_grad():
        want = float(loss_fn(whole, targets))
    got = float(sum(loss for _, loss in seen))
    if abs(got - want) > 1e-5 * max(1.0, abs(want)):
        raise CriterionError(
            f"batch_chunk: on calibration batch {batch_index} the loss of the whole batch "
            f"({want:.6g}) is not the share-weighted sum of its sub-batches' ({got:.6g}), so "
            "sub-batch scores would not add up: use a loss that is the batch mean of "
            "per-sample losses, or score without batch_chunk")


# ----------------------------------------------------------------------------- the loop
def require_batches(batches, desc: str) -> None:
    """Refuse an empty batch list: :class:`CriterionError` saying criterion ``desc``
    needs calibration data."""
    if not batches:
        raise CriterionError(f"{desc} needs calibration data (at least one batch)")


def zero_sums(params: Dict[str, Tensor], *kinds: str) -> Dict[str, Tensor]:
    """Float64 zero accumulators shaped like ``params`` (on their devices): keyed by
    parameter name, or ``"kind:name"`` for every kind in ``kinds``."""
    keys = [(n if not kinds else f"{k}:{n}", p) for k in (kinds or ("",))
            for n, p in params.items()]
    return {key: torch.zeros(p.shape, dtype=torch.float64, device=p.device)
            for key, p in keys}


def calibrate(module: nn.Module, batches, step: Callable[[int, Tuple[Tensor, ...], Any], Any],
              sums: Dict[str, Tensor], *, desc: str, progress: bool = False
              ) -> Tuple[Dict[str, Tensor], Any]:
    """The calibration loop of every data-driven criterion.

    Refuses an empty ``batches`` (:func:`require_batches`); runs ``step(i, inputs,
    targets)`` on every batch cast to ``module``'s device and floating dtype
    (:func:`cast_batch`), under a progress bar named ``desc`` when ``progress``. The step
    adds batch ``i``'s statistics into ``sums`` in place (checking its loss with
    :func:`batch_loss`) and returns how much the batch counts: ``None`` for one batch,
    or a number (e.g. its samples). Returns ``(sums, count)`` summed over every
    data-parallel rank (:func:`all_reduce_sums`); the caller divides."""
    require_batches(batches, desc)
    count = 0
    for i, batch in enumerate(progress_iter(batches, progress, desc)):
        inputs, targets = cast_batch(batch, module)
        weight = step(i, inputs, targets)
        count += 1 if weight is None else weight
    return all_reduce_sums(sums, count)


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
