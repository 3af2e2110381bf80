"""Tiny transformer-style fixtures: timm-style attention, a ViT and a ConvNeXt.

The attention is written exactly the way timm writes it (no fused
``scaled_dot_product_attention``), so the analysis pass sees the same node pattern:
``qkv`` Linear -> ``reshape(B, N, 3, heads, head_dim)`` -> ``permute(2, 0, 3, 1, 4)`` ->
``unbind(0)`` -> ``q @ k.transpose(-2, -1) * scale`` -> softmax -> ``@ v`` ->
``transpose(1, 2).reshape(B, N, heads * head_dim)`` -> ``proj`` Linear. Like timm, the
head count and head size are Python constants baked into the traced graph.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention over ``[B, N, dim]`` tokens (timm layout, unfused)."""

    def __init__(self, dim: int, heads: int = 2, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.num_heads = heads
        self.head_dim = dim // heads
        self.attn_dim = heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(x)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch-embed conv, cls token, learned pos embed, ``depth`` blocks, final norm, cls head."""

    def __init__(self, num_classes: int = 10, img_size: int = 16, patch: int = 4,
                 dim: int = 16, depth: int = 2, heads: int = 2, mlp_ratio: float = 2.0):
        super().__init__()
        self.input_size = (3, img_size, img_size)
        num_patches = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x)[:, 0])


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> channels-last LayerNorm -> Linear 4x -> GELU -> Linear -> gamma * x, + input."""

    def __init__(self, dim: int, ls_init: float = 0.1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + y


class TinyConvNeXt(nn.Module):
    """Patchify stem (2x2/2 conv + BN), ``depth`` ConvNeXt blocks, mean pool, LayerNorm, head.

    ``ls_init`` (LayerScale init) defaults to 0.1 instead of ConvNeXt's 1e-6 so the
    residual branches carry non-negligible signal in pruning tests.
    """

    def __init__(self, num_classes: int = 10, dim: int = 16, depth: int = 2, ls_init: float = 0.1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 2, 2), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, ls_init) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean((2, 3))))


class TinyAttention(nn.Module):
    """One attention layer over ``[B, tokens, dim]`` input, token mean, Linear head.

    No norm and no residual: a minimal graph for scoring oracles. ``heads=1`` gives
    single-head attention (head_dim = dim).
    """

    def __init__(self, num_classes: int = 10, dim: int = 16, heads: int = 2, tokens: int = 8):
        super().__init__()
        self.input_size = (tokens, dim)
        self.attn = Attention(dim, heads)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x).mean(1))


@register_model("tiny_vit", "ViT: patch conv, cls token, pos embed, 2 pre-LN blocks of "
                "2-head timm-style attention + GELU MLP", input_size=(3, 16, 16))
def tiny_vit(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinyViT`; input ``[B, 3, 16, 16]`` (16 patches of 4x4, dim 16)."""
    return TinyViT(num_classes=num_classes, **kwargs)


@register_model("tiny_convnext", "ConvNeXt blocks: depthwise 7x7, permute, LayerNorm, Linear 4x, "
                "GELU, Linear, LayerScale, permute back, residual", input_size=(3, 16, 16))
def tiny_convnext(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinyConvNeXt`; input ``[B, 3, 16, 16]`` (8x8 feature map, dim 16)."""
    return TinyConvNeXt(num_classes=num_classes, **kwargs)


@register_model("tiny_attention", "single attention layer over [B, 8, 16] tokens "
                "(kwarg heads: 1 = single-head, default 2)", input_size=(8, 16))
def tiny_attention(num_classes: int = 10, heads: int = 2, **kwargs) -> nn.Module:
    """:class:`TinyAttention`; input ``[B, tokens=8, dim=16]``."""
    return TinyAttention(num_classes=num_classes, heads=heads, **kwargs)
