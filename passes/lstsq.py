"""Layer-wise least squares for the repair pass (design §7b): Gram statistics and the
damped re-fit of one Linear / Conv layer.

Contract: :class:`LayerGram` reads a layer's (slim) inputs and the dense model's output
of that layer, batch by batch, and keeps only sums — ``H = Σ x̃ x̃ᵀ`` (``x̃ = [x; 1]``, one
row per output position: a token of a Linear, a pixel of a conv through ``unfold``),
``C = Σ y x̃ᵀ`` and ``Σ ‖y‖²`` — per conv group, in float64 (``H`` in float32 where
the caller asks: the obs criterion's float32 solves). Memory is about
``groups × d²/2`` for ``d = in_per_group · kernel + 1`` (``H`` is stored as its upper
panels), independent of the data size.
:func:`solve` returns the minimiser of

    Σ ‖W′ x̃ − y‖² + λ ‖W′ − W₀‖²,   λ = α · mean(diag H)

(ridge toward the layer's current kept weights ``W₀``, not toward zero: a prototype on
a real CNN showed shrinking toward zero hurts on unseen images). :func:`error` evaluates
the same squared error from another split's sums, so damping is chosen on held-out
batches without storing activations. Nothing here touches a module; the pass does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerGram", "REFIT_TYPES", "ROWS_PER_UNKNOWN", "augmented_gram", "augmented_weight",
           "error", "gram_diagonal", "gram_panels", "row_count", "sampled_rows",
           "set_augmented_weight", "solve", "unpack_gram", "unsupported_reason"]

#: Rows (output positions) per unknown sampled from each batch for a layer's Gram sums
#: (the repair pass and the obs criterion alike): a 3x3 conv at 56x56 has ~50 rows per
#: unknown per image, mostly redundant.
ROWS_PER_UNKNOWN = 8
#: Layer module types whose input weights the repair pass can re-fit.
REFIT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be re-fitted by least squares, or None when it can."""
    if not isinstance(module, REFIT_TYPES):
        return f"{type(module).__name__} layers are not re-fitted (Linear, Conv1d, Conv2d are)"
    return None


def _conv_geometry(conv: nn.Module):
    """(kernel, stride, dilation) as 2-tuples; Conv1d is a conv over a 1 x L image."""
    if isinstance(conv, nn.Conv1d):
        return ((1, conv.kernel_size[0]), (1, conv.stride[0]), (1, conv.dilation[0]))
    return tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)


def _conv_input(layer: nn.Module, x: Tensor, y: Tensor):
    """``(padded 4-d input, 4-d output, kernel, stride, dilation)`` of a conv layer call;
    Conv1d is a conv over a 1 x L image."""
    if isinstance(layer, nn.Conv1d):
        x, y = x.unsqueeze(-2), y.unsqueeze(-2)
    kernel, stride, dilation = _conv_geometry(layer)
    pad = layer._reversed_padding_repeated_twice  # also covers padding="same"
    if isinstance(layer, nn.Conv1d):
        pad = list(pad) + [0, 0]
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, list(pad), mode=mode)
    return x, y, kernel, stride, dilation


def _by_group(rows: Tensor, groups: int) -> Tensor:
    """``[R, G·k] -> [G, R, k]``: a conv group's channels are contiguous."""
    return rows.reshape(rows.shape[0], groups, -1).transpose(0, 1).contiguous()


def layer_rows(layer: nn.Module, x: Tensor, y: Tensor, pick: Optional[Tensor] = None
               ) -> Tuple[Tensor, Tensor]:
    """Design rows of ``layer``: ``([G, R, d], [G, R, o])`` — the input patch of every
    output position (without the bias 1) and the target output there, per conv group.
    Rows run over (sample, output position), position fastest. ``pick``: only these
    rows (indices into that order), gathered straight from the input — the same rows
    as indexing the full result, without unfolding every position first."""
    if isinstance(layer, nn.Linear):
        cols, out = x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1])
        return (cols, out) if pick is None else (cols[:, pick], out[:, pick])
    x, y, kernel, stride, dilation = _conv_input(layer, x, y)
    n, groups = x.shape[0], layer.groups
    if pick is not None:
        return _picked_patches(x, y, pick, kernel, stride, dilation, groups)
    if kernel == (1, 1) and stride == (1, 1):
        cols = x.reshape(x.shape[0], x.shape[1], -1)  # a 1x1 conv needs no unfold
    else:
        cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, C*k, L]
    cols = cols.reshape(n, groups, -1, cols.shape[-1]).permute(1, 0, 3, 2)
    out = y.reshape(n, groups, y.shape[1] // groups, -1).permute(1, 0, 3, 2)
    return cols.reshape(groups, -1, cols.shape[-1]), out.reshape(groups, -1, out.shape[-1])


def row_count(layer: nn.Module, y: Tensor) -> int:
    """Design rows of one call of ``layer`` with output ``y`` (:func:`layer_rows`): one
    per token of a Linear, one per sample and output position of a conv."""
    return y.numel() // y.shape[-1 if isinstance(layer, nn.Linear) else 1]


def sampled_rows(layer: nn.Module, x: Tensor, y: Tensor, max_rows: Optional[int] = None
                 ) -> Tuple[Tensor, Tensor]:
    """:func:`layer_rows` of one call, at most ``max_rows`` of them: a uniform sample
    seeded by the call's row count, so that every statistic of the same call (the exact
    Gram, the factored one of :mod:`.kron_gram`) sees the same rows."""
    total, pick = row_count(layer, y), None
    if max_rows is not None and total > max_rows:
        gen = torch.Generator().manual_seed(total)
        pick = torch.randperm(total, generator=gen)[:max_rows].to(x.device)
    return layer_rows(layer, x, y, pick)


def _picked_patches(x: Tensor, y: Tensor, pick: Tensor, kernel, stride, dilation,
                    groups: int) -> Tuple[Tensor, Tensor]:
    """:func:`layer_rows` of a padded conv input ``x`` at rows ``pick`` only: one
    gather of ``[R, C, kh·kw]`` (unfold's column order: channel, then kernel row-major)."""
    out_h, out_w = y.shape[-2:]
    sample, pos = pick // (out_h * out_w), pick % (out_h * out_w)
    oh, ow = pos // out_w, pos % out_w
    ki = torch.arange(kernel[0], device=x.device).repeat_interleave(kernel[1])
    kj = torch.arange(kernel[1], device=x.device).repeat(kernel[0])
    rows_h = (oh * stride[0]).unsqueeze(1) + ki * dilation[0]      # [R, K]
    rows_w = (ow * stride[1]).unsqueeze(1) + kj * dilation[1]
    # Whole channel vectors per (sample, pixel): one row gather of a channels-last copy.
    n, c, height, width = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(n * height * width, c)
    flat = (sample.unsqueeze(1) * height + rows_h) * width + rows_w
    patches = pixels.index_select(0, flat.reshape(-1)).reshape(len(pick), -1, c)
    patches = patches.transpose(1, 2)                                # [R, C, K]
    targets = y[sample, :, oh, ow]                                  # [R, O]
    return (_by_group(patches.reshape(len(pick), -1), groups), _by_group(targets, groups))


def augmented_weight(layer: nn.Module) -> Tensor:
    """``[G, o, d]``: each group's output rows of the weight, flattened like the rows of
    :func:`layer_rows`, with the bias (or 0) as the last column; float64."""
    w = layer.weight.detach().double()
    groups = getattr(layer, "groups", 1)
    w = w.reshape(groups, w.shape[0] // groups, -1)
    b = (layer.bias.detach().double() if layer.bias is not None
         else torch.zeros(layer.weight.shape[0], dtype=torch.float64, device=w.device))
    return torch.cat([w, b.reshape(groups, -1, 1)], dim=2)


def set_augmented_weight(layer: nn.Module, w_aug: Tensor) -> None:
    """Write an augmented weight back; the bias column is dropped when the layer has no
    bias (:func:`solve` with ``has_bias=False`` keeps that column 0)."""
    w = w_aug[..., :-1].reshape(layer.weight.shape)
    with torch.no_grad():
        layer.weight.copy_(w.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(w_aug[..., -1].reshape(-1).to(layer.bias.dtype))


#: Input patches at least this wide keep their Gram as upper block-row panels of
#: ``GRAM_PANEL_ROWS`` rows (:func:`gram_panels`): about half the memory of the full
#: matrix (all consumer layers' sums coexist while obs scores), and the products skip
#: the lower triangle (the product ``XᵀX`` alone does not exploit symmetry).
GRAM_BLOCK_MIN = 512
GRAM_PANEL_ROWS = 256


def _panel_bounds(n: int) -> List[Tuple[int, int]]:
    """``(first, end)`` rows of each panel of an ``n x n`` augmented Gram."""
    step = GRAM_PANEL_ROWS if n - 1 >= GRAM_BLOCK_MIN else n
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def gram_panels(cols: Tensor, dtype: torch.dtype = torch.float64) -> List[Tensor]:
    """The upper block-row panels of the ``[G, d+1, d+1]`` ``Σ x̃x̃ᵀ`` of rows ``cols``
    ``[G, R, d]``, ``x̃ = [x; 1]``, in ``dtype``: panel ``k`` holds rows ``i:e`` and
    columns ``i:`` (its diagonal block whole). The 1 column is a row sum, not
    concatenated; products in the rows' dtype. :func:`unpack_gram` assembles the full
    matrix."""
    g, rows, d = cols.shape
    n, s = d + 1, cols.sum(1)
    panels = []
    for i, e in _panel_bounds(n):
        r = min(e, d)  # the data rows of this panel (the last also has the 1 row)
        p = cols.new_empty(g, e - i, n - i)
        if r > i:
            p[:, :r - i, :d - i] = torch.bmm(cols[:, :, i:r].transpose(1, 2), cols[:, :, i:])
            p[:, :r - i, d - i] = s[:, i:r]
        if e == n:
            p[:, d - i, :d - i] = s[:, i:]
            p[:, d - i, d - i] = rows
        panels.append(p.to(dtype))
    return panels


def unpack_gram(panels: Sequence[Tensor], dtype: Optional[torch.dtype] = None,
                shift: float = 0.0, size: Optional[int] = None) -> Tensor:
    """The full symmetric matrix of :func:`gram_panels`' panels (a new tensor): its
    leading ``size`` rows and columns (default all), ``+ shift`` on the diagonal (added
    in the panels' dtype, then rounded to ``dtype``: the damped matrix of a float32
    solve without a float64 copy of the whole)."""
    g, n = panels[0].shape[0], panels[0].shape[-1]
    m = n if size is None else size
    out = panels[0].new_empty(g, m, m, dtype=dtype or panels[0].dtype)
    i = 0
    for p in panels:
        if i >= m:
            break
        e = min(i + p.shape[1], m)
        block = p[:, :e - i, :m - i]
        if shift:
            block = block.clone()
            block.diagonal(dim1=1, dim2=2).add_(shift)
        out[:, i:e, i:] = block
        out[:, e:, i:e] = block[:, :, e - i:].transpose(1, 2)
        i = e
    return out


def gram_diagonal(panels: Sequence[Tensor]) -> Tensor:
    """``[G, n]``: the diagonal of the matrix the panels hold."""
    return torch.cat([p.diagonal(dim1=1, dim2=2) for p in panels], dim=1)


def augmented_gram(cols: Tensor) -> Tensor:
    """``[G, d+1, d+1]`` float64 ``Σ x̃x̃ᵀ`` of rows ``cols`` ``[G, R, d]`` (full)."""
    return unpack_gram(gram_panels(cols))


@dataclass
class LayerGram:
    """Sums of one layer's least-squares problem over calibration rows. ``H`` is kept
    as the upper panels of :func:`gram_panels`, in ``dtype`` (float64; float32 halves
    the memory where the solves are float32 anyway); the property assembles it (read it
    once per use: each access builds a new ``[G, d, d]`` tensor)."""

    panels: Optional[List[Tensor]] = None  # upper block-row panels of H = Σ x̃x̃ᵀ
    C: Optional[Tensor] = None     # [G, o, d]; None when accumulated with cross=False
    yy: float = 0.0
    rows: int = 0
    dtype: torch.dtype = torch.float64

    @property
    def H(self) -> Optional[Tensor]:
        """``[G, d, d]`` ``Σ x̃x̃ᵀ`` in :attr:`dtype`, or None before the first batch."""
        return None if self.panels is None else unpack_gram(self.panels)

    def add(self, layer: nn.Module, x: Tensor, y: Tensor, max_rows: Optional[int] = None,
            cross: bool = True) -> None:
        """Accumulate one batch: ``x`` the layer's input, ``y`` the target output.
        ``max_rows``: use at most this many rows (output positions) of the batch, a
        seeded uniform sample — neighbouring pixels of one image are nearly redundant
        rows, and the Gram product costs ``rows x d²``. ``cross=False`` skips ``C``
        (the obs criterion needs only ``H`` and ``Σ‖y‖²``)."""
        cols, out = sampled_rows(layer, x, y, max_rows)
        h = gram_panels(cols, self.dtype)
        self.panels = h if self.panels is None else [a.add_(b) for a, b in zip(self.panels, h)]
        if cross:
            cols = torch.cat([cols, torch.ones_like(cols[..., :1])], dim=-1)
            c = torch.bmm(out.transpose(1, 2), cols).double()
            self.C = c if self.C is None else self.C + c
        self.yy += float(out.pow(2).sum(dtype=torch.float64))
        self.rows += cols.shape[1]

    def __add__(self, other: "LayerGram") -> "LayerGram":
        cross = None if self.C is None or other.C is None else self.C + other.C
        panels = [a + b for a, b in zip(self.panels, other.panels)]
        return LayerGram(panels, cross, self.yy + other.yy, self.rows + other.rows,
                         self.dtype)

    @property
    def called(self) -> bool:
        """Whether any batch was accumulated."""
        return self.panels is not None

    @property
    def unknowns(self) -> int:
        """Unknowns per output row (input patch size + bias)."""
        return int(self.panels[0].shape[-1])


def solve(gram: LayerGram, w0: Tensor, alpha: float, has_bias: bool = True) -> Tensor:
    """Minimiser of ``Σ‖W x̃ − y‖² + λ‖W − w0‖²`` with ``λ = alpha · mean(diag H)``
    per group (``alpha = 0``: plain least squares, a pseudo-inverse solve). Without a
    bias the last column stays 0 (the constant row is dropped from the system)."""
    H, C, W0 = gram.H, gram.C, w0
    if not has_bias:
        H, C, W0 = H[:, :-1, :-1], C[..., :-1], W0[..., :-1]
    d = H.shape[-1]
    scale = torch.diagonal(H, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
    lam = (alpha * scale).reshape(-1, 1, 1)
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    rhs = (C + lam * W0).transpose(1, 2)          # [G, d, o]
    if alpha > 0:  # H + λI is symmetric positive definite: Cholesky, half an LU's work
        factor, info = torch.linalg.cholesky_ex(H + lam * eye)
        sol = (torch.cholesky_solve(rhs, factor) if not bool(info.any())
               else torch.linalg.solve(H + lam * eye, rhs))
    else:
        sol = torch.linalg.lstsq(H, rhs, driver="gelsd" if H.device.type == "cpu" else None).solution
    w = sol.transpose(1, 2)
    if not has_bias:
        w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=2)
    return w


def error(gram: LayerGram, w_aug: Tensor) -> float:
    """``Σ ‖W x̃ − y‖²`` over the rows summed in ``gram``, from its sums alone."""
    quad = (torch.bmm(w_aug, gram.H) * w_aug).sum()  # H assembled once
    cross = (w_aug * gram.C).sum()
    return max(float(quad - 2 * cross + gram.yy), 0.0)
