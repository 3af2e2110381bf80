"""The building blocks of the fuzzed architectures (see fuzz_arch.py for the spec
format each block reads): image blocks, token blocks and :class:`FuzzNet`, which
assembles them from a spec."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 3


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
