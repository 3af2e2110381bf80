"""Random FX-traceable architectures for property-based tests of the whole pipeline.

A *spec* is plain data (a dict of ints, strings and tuples) so that a failing example
that hypothesis shrinks can be pasted into a regression test verbatim::

    {"seed": 0, "in_ch": 3, "hw": 4, "train": False,
     "blocks": (("conv", 6, 3, "plain", "bn", "relu"), ("tokens",), ("attn", 2, 2, "ln", "lit")),
     "head": "mean"}

:func:`build` turns a spec into ``(model, example_input, leaf_modules)``: a float64
model with random weights and random BatchNorm statistics. :func:`specs` is the
hypothesis strategy. Image blocks work on ``[B, C, H, W]``; ``("tokens",)`` switches
to ``[B, N, C]`` (flatten + transpose) where the token blocks apply.

Image blocks
    ``("conv", out, k, kind, norm, act)``  kind: plain / grouped / depthwise;
        norm: bn / gn / none; act: relu / gelu / silu / none
    ``("res", norm)``                      conv-norm-relu-conv-norm + identity
    ``("cat", w1, w2, with_x)``            torch.cat of two conv branches (and x)
    ``("split", sizes, mode)``             conv, torch.split(uneven sizes), the first
        piece through a conv, re-joined by cat (reversed order) or add
    ``("chunk", n, width, mode)``          conv, chunk(n), re-joined by cat or add
    ``("se", hidden, literal)``            squeeze-excite gating multiply (view with
        literal sizes, or unsqueeze)
    ``("shared",)``                        one conv module called twice
    ``("fft",)``                           an op without a channel rule (fft(...).real)
    ``("leaf",)``                          a custom module traced as a leaf
    ``("buffer",)``                        a registered ``[C]`` buffer added
Token blocks
    ``("attn", heads, head_dim, norm, final)``  timm-style attention: qkv ->
        reshape(B,N,3,H,D) -> permute -> unbind -> softmax(q@kᵀ)@v -> reshape -> proj,
        residual; final reshape with literal H*D ("lit") or -1 ("neg")
    ``("mlp", hidden)``                    pre-LayerNorm MLP with residual
    ``("tlinear", out, ln)``               token-wise Linear (+ LayerNorm)
    ``("tfft",)``                          an unknown op over the token dim
Heads: image ``"gap"`` (avg pool -> Linear) / ``"flatten"`` (flatten -> Linear);
tokens ``"mean"`` / ``"flatten"``.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

NUM_CLASSES = 3
BATCH = 2


# ----------------------------------------------------------------------------- blocks
def _norm2d(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(2 if c % 2 == 0 else 1, c)
    return nn.Identity()


def _act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}.get(kind, nn.Identity())


class ConvBlock(nn.Module):
    def __init__(self, c: int, out: int, k: int, kind: str, norm: str, act: str):
        super().__init__()
        if kind == "depthwise":
            out, groups = c * (2 if out >= 2 * c else 1), c
        elif kind == "grouped" and c % 2 == 0 and out % 2 == 0:
            groups = 2
        else:
            groups = 1
        self.conv = nn.Conv2d(c, out, k, padding=k // 2, groups=groups, bias=norm == "none")
        self.norm = _norm2d(norm, out)
        self.act = _act(act)
        self.out = out

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    def __init__(self, c: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.n1 = _norm2d(norm, c)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)
        self.n2 = _norm2d(norm, c)
        self.out = c

    def forward(self, x):
        y = F.relu(self.n1(self.conv1(x)))
        return F.relu(self.n2(self.conv2(y)) + x)


class CatBlock(nn.Module):
    def __init__(self, c: int, w1: int, w2: int, with_x: bool):
        super().__init__()
        self.b1 = nn.Conv2d(c, w1, 1)
        self.b2 = nn.Sequential(nn.Conv2d(c, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2))
        self.with_x = with_x
        self.out = w1 + w2 + (c if with_x else 0)

    def forward(self, x):
        parts = [self.b1(x), F.relu(self.b2(x))]
        if self.with_x:
            parts = [parts[0], x, parts[1]]
        return torch.cat(parts, dim=1)


class SplitBlock(nn.Module):
    def __init__(self, c: int, sizes: Tuple[int, ...], mode: str):
        super().__init__()
        self.sizes = list(sizes)
        self.mode = mode if len(set(sizes)) == 1 else "cat"
        self.pre = nn.Conv2d(c, sum(sizes), 1)
        self.inner = nn.Conv2d(sizes[0], sizes[0], 3, padding=1)
        self.out = sum(sizes) if self.mode == "cat" else sizes[0]

    def forward(self, x):
        pieces = torch.split(self.pre(x), self.sizes, dim=1)
        parts = [pieces[i] for i in range(len(self.sizes))]
        parts[0] = F.relu(self.inner(parts[0]))
        if self.mode == "cat":
            return torch.cat(parts[::-1], dim=1)
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out


class ChunkBlock(nn.Module):
    def __init__(self, c: int, n: int, width: int, mode: str):
        super().__init__()
        self.n = n
        self.mode = mode
        self.pre = nn.Conv2d(c, n * width, 1, bias=False)
        self.bn = nn.BatchNorm2d(n * width)
        self.out = n * width if mode == "cat" else width

    def forward(self, x):
        pieces = self.bn(self.pre(x)).chunk(self.n, dim=1)
        parts = [pieces[i] for i in range(self.n)]
        if self.mode == "cat":
            return torch.cat([parts[-1]] + parts[:-1], dim=1)
        out = parts[0]
        for p in parts[1:]:
            out = out * torch.sigmoid(p) if self.mode == "gate" else out + p
        return out


class SEBlock(nn.Module):
    def __init__(self, c: int, hidden: int, literal: bool):
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.literal = literal
        self.c = c
        self.out = c

    def forward(self, x):
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        if self.literal:
            s = s.view(x.shape[0], self.c, 1, 1)
        else:
            s = s.unsqueeze(-1).unsqueeze(-1)
        return x * s


class SharedBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.shared = nn.Conv2d(c, c, 1)
        self.out = c

    def forward(self, x):
        return self.shared(F.relu(self.shared(x)))


class FFTBlock(nn.Module):
    """``torch.fft.fft`` has no channel rule: every channel it touches is unprunable."""

    def __init__(self, c: int):
        super().__init__()
        self.out = c

    def forward(self, x):
        return torch.fft.fft(x, dim=-1).real


class OpaqueLeaf(nn.Module):
    """Traced as a leaf (``leaf_modules=[OpaqueLeaf]``), with a per-channel parameter:
    the analysis cannot see inside, so every channel it touches is unprunable."""

    def __init__(self, c: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)
        self.out = c

    def forward(self, x):
        if x.dim() == 3:  # tokens: [B, N, C]
            return x * self.scale
        return x * self.scale.view(1, -1, 1, 1)


class BufferBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("offset", torch.randn(c))
        self.out = c

    def forward(self, x):
        return x + self.offset.view(1, -1, 1, 1)


class ToTokens(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.out = c

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm-style attention with its own residual."""

    def __init__(self, c: int, heads: int, head_dim: int, norm: str, final: str):
        super().__init__()
        self.heads, self.head_dim, self.final = heads, head_dim, final
        self.norm = nn.LayerNorm(c) if norm == "ln" else nn.Identity()
        self.qkv = nn.Linear(c, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, c)
        self.scale = head_dim ** -0.5
        self.out = c

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        y = attn.softmax(dim=-1) @ v
        if self.final == "lit":
            y = y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
        else:
            y = y.transpose(1, 2).reshape(B, N, -1)
        return x + self.proj(y)


class MLP(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.out = c

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TokenLinear(nn.Module):
    def __init__(self, c: int, out: int, ln: bool):
        super().__init__()
        self.fc = nn.Linear(c, out)
        self.norm = nn.LayerNorm(out) if ln else nn.Identity()
        self.out = out

    def forward(self, x):
        return self.norm(self.fc(x))


class TokenFFT(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.out = c

    def forward(self, x):
        return torch.fft.fft(x, dim=1).real


IMAGE_BLOCKS = {
    "conv": ConvBlock, "res": ResBlock, "cat": CatBlock, "split": SplitBlock,
    "chunk": ChunkBlock, "se": SEBlock, "shared": SharedBlock, "fft": FFTBlock,
    "leaf": OpaqueLeaf, "buffer": BufferBlock, "tokens": ToTokens,
}
TOKEN_BLOCKS = {
    "attn": Attention, "mlp": MLP, "tlinear": TokenLinear, "tfft": TokenFFT,
    "leaf": OpaqueLeaf,
}


class FuzzNet(nn.Module):
    def __init__(self, spec: Dict[str, Any]):
        super().__init__()
        c, tokens = spec["in_ch"], False
        layers = []
        for block in spec["blocks"]:
            name, args = block[0], block[1:]
            table = TOKEN_BLOCKS if tokens else IMAGE_BLOCKS
            layer = table[name](c, *args)
            layers.append(layer)
            c = layer.out
            tokens = tokens or name == "tokens"
        self.body = nn.Sequential(*layers)
        self.tokens = tokens
        self.head_kind = spec["head"]
        with torch.no_grad():
            feat = self.body.eval()(torch.zeros(1, spec["in_ch"], spec["hw"], spec["hw"]))
        if self.head_kind == "flatten":
            width = feat[0].numel()
        else:
            width = feat.shape[-1] if tokens else feat.shape[1]
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x):
        y = self.body(x)
        if self.head_kind == "flatten":
            y = y.flatten(1)
        elif self.tokens:
            y = y.mean(1)
        else:
            y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.head(y)


def randomize(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random (non-trivial) BN statistics and affine parameters, in place."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.2)
    return model


def build(spec: Dict[str, Any]):
    """``(model, x, leaf_modules)`` for a spec: float64, random weights and BN stats,
    in train mode when ``spec["train"]`` (the pipeline must not care)."""
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    model = randomize(FuzzNet(spec), gen).double()
    model.train(bool(spec.get("train", False)))
    x = torch.randn(BATCH, spec["in_ch"], spec["hw"], spec["hw"], generator=gen,
                    dtype=torch.float64)
    return model, x, (OpaqueLeaf,)


# ----------------------------------------------------------------------------- strategy
widths = st.integers(1, 6)
_ACTS = st.sampled_from(["relu", "gelu", "silu", "none"])
_NORMS = st.sampled_from(["bn", "gn", "none"])


# Analysis bugs the fuzzer found, now fixed (see the regression tests in test_fuzz.py):
# elementwise ops between width-1 slices of a larger group, and single-head attention.
# Set to True to steer the strategy around them again (e.g. when bisecting).
AVOID_KNOWN_BUGS = False


def _steer(block):
    """Rewrite a drawn block so that it avoids the known bugs (a map, not a filter:
    hypothesis never has to retry)."""
    if not AVOID_KNOWN_BUGS:
        return block
    if block[0] == "chunk" and block[2] == 1 and block[3] != "cat":
        return block[:2] + (2,) + block[3:]
    if block[0] == "split" and block[2] == "add" and set(block[1]) == {1}:
        return (block[0], block[1], "cat")
    if block[0] == "attn" and block[1] == 1:
        return (block[0], 2) + block[2:]
    return block


def image_block() -> st.SearchStrategy:
    return _image_block().map(_steer)


def token_block() -> st.SearchStrategy:
    return _token_block().map(_steer)


def _image_block() -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("conv"), st.integers(1, 8), st.sampled_from([1, 3]),
                  st.sampled_from(["plain", "grouped", "depthwise"]), _NORMS, _ACTS),
        st.tuples(st.just("res"), st.sampled_from(["bn", "gn", "none"])),
        st.tuples(st.just("cat"), widths, widths, st.booleans()),
        st.tuples(st.just("split"), st.lists(st.integers(1, 4), min_size=2, max_size=3).map(tuple),
                  st.sampled_from(["cat", "add"])),
        st.tuples(st.just("chunk"), st.integers(2, 3), st.integers(1, 3),
                  st.sampled_from(["cat", "add", "gate"])),
        st.tuples(st.just("se"), st.integers(1, 3), st.booleans()),
        st.tuples(st.just("shared")),
        st.sampled_from([("fft",), ("leaf",), ("buffer",)]),  # rarer: unknown ops block
    )


def _token_block() -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("attn"), st.integers(1, 3), st.integers(1, 3),
                  st.sampled_from(["ln", "none"]), st.sampled_from(["lit", "neg"])),
        st.tuples(st.just("mlp"), st.integers(1, 8)),
        st.tuples(st.just("tlinear"), st.integers(1, 6), st.booleans()),
        st.sampled_from([("tfft",), ("leaf",)]),
    )


@st.composite
def specs(draw, max_blocks: int = 5) -> Dict[str, Any]:
    stem = draw(st.tuples(st.just("conv"), st.integers(3, 8), st.sampled_from([1, 3]),
                          st.just("plain"), _NORMS, _ACTS))
    tokens = draw(st.booleans())
    blocks = [stem] + draw(st.lists(image_block(), min_size=0 if tokens else 1,
                                    max_size=max_blocks - 1))
    if tokens:
        blocks.append(("tokens",))
        blocks += draw(st.lists(token_block(), min_size=1, max_size=max_blocks - 1))
        head = draw(st.sampled_from(["mean", "flatten"]))
    else:
        head = draw(st.sampled_from(["gap", "flatten"]))
    return {"seed": draw(st.integers(0, 2 ** 16)), "in_ch": draw(st.integers(1, 3)),
            "hw": draw(st.sampled_from([2, 3, 4])), "train": draw(st.booleans()),
            "blocks": tuple(blocks), "head": head}


def random_plan(groups, seed: int) -> Dict[str, list]:
    """A random non-empty kept subset for every prunable group (nothing else respected)."""
    import random
    rng = random.Random(seed)
    kept = {}
    for g in groups:
        if not g.prunable:
            continue
        k = rng.randint(1, g.size)
        kept[g.id] = sorted(rng.sample(range(g.size), k))
    return kept
