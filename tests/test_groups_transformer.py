"""Channel analysis (design §3): golden groups of the attention fixtures (heads, the
token stream, layer scale), written as in test_groups.py."""
from __future__ import annotations

from goldens import (analysed, attention_group, bias, bn, check_groups, classifier, cons,
                     ident, ln, members_of, merge, prod, tensor)


def test_tiny_vit_heads_stream_and_tokens():
    """Heads: 3 * head_dim qkv rows and head_dim proj columns per head. The residual
    stream holds the patch embedding, cls_token and pos_embed (their channel dim 2),
    every LayerNorm, the proj/fc2 rows, the qkv/fc1 columns and the head's columns."""
    _, _, groups = analysed("tiny_vit")
    i16, i32 = ident(16), ident(32)
    stream = [prod("patch_embed.weight", i16), bias("patch_embed.bias", i16),
              tensor("cls_token", 2, i16), tensor("pos_embed", 2, i16),
              ln("norm", i16), cons("head.weight", i16)]
    for b in ("blocks.0", "blocks.1"):
        stream += [ln(f"{b}.norm1", i16), cons(f"{b}.attn.qkv.weight", i16),
                   prod(f"{b}.attn.proj.weight", i16), bias(f"{b}.attn.proj.bias", i16),
                   ln(f"{b}.norm2", i16), cons(f"{b}.mlp.fc1.weight", i16),
                   prod(f"{b}.mlp.fc2.weight", i16), bias(f"{b}.mlp.fc2.bias", i16)]

    def mlp(b):
        return (f"{b}.mlp.fc1", 32, "channel", True, merge(
            prod(f"{b}.mlp.fc1.weight", i32), bias(f"{b}.mlp.fc1.bias", i32),
            cons(f"{b}.mlp.fc2.weight", i32)))

    check_groups(groups, [
        ("patch_embed", 16, "stream", True, merge(*stream)),
        attention_group("blocks.0.attn"), mlp("blocks.0"),
        attention_group("blocks.1.attn"), mlp("blocks.1"),
        classifier("head", "head"),
    ])


def test_tiny_convnext_layer_scale_in_stream():
    """Depthwise conv couples in/out; the permuted LayerNorm, the LayerScale gamma and the
    pointwise Linears join the residual stream; mean over H, W keeps channels for the head."""
    _, _, groups = analysed("tiny_convnext")
    i16, i64 = ident(16), ident(64)
    stream = [prod("stem.0.weight", i16), bias("stem.0.bias", i16), bn("stem.1", i16),
              ln("norm", i16), cons("head.weight", i16)]
    for b in ("blocks.0", "blocks.1"):
        stream += [prod(f"{b}.dwconv.weight", i16), bias(f"{b}.dwconv.bias", i16),
                   ln(f"{b}.norm", i16), cons(f"{b}.pwconv1.weight", i16),
                   prod(f"{b}.pwconv2.weight", i16), bias(f"{b}.pwconv2.bias", i16),
                   tensor(f"{b}.gamma", 0, i16)]

    def mlp(b):
        return (f"{b}.pwconv1", 64, "channel", True, merge(
            prod(f"{b}.pwconv1.weight", i64), bias(f"{b}.pwconv1.bias", i64),
            cons(f"{b}.pwconv2.weight", i64)))

    check_groups(groups, [("stem.0", 16, "stream", True, merge(*stream)),
                          mlp("blocks.0"), mlp("blocks.1"), classifier("head", "head")])


def test_tiny_attention_heads_and_token_mean():
    _, _, groups = analysed("tiny_attention")
    i16 = ident(16)
    check_groups(groups, [
        attention_group("attn"),
        ("attn.proj", 16, "channel", True, merge(prod("attn.proj.weight", i16), bias("attn.proj.bias", i16),
                                                 cons("head.weight", i16))),
        classifier("head", "head"),
    ])


def test_single_head_attention_is_not_prunable():
    """One head is one channel, and a group never loses all its channels."""
    _, _, groups = analysed("tiny_attention", heads=1)
    g = groups["attn.qkv"]
    assert (g.size, g.kind, g.prunable) == (1, "head", False)
    assert "single channel" in g.reason
    assert members_of(g)[("attn.qkv.weight", 0)] == ("producer", [list(range(48))])
