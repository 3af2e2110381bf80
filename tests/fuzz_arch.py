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

from typing import Any, Dict

import torch
from hypothesis import strategies as st
from torch import nn

from fuzz_blocks import NUM_CLASSES, FuzzNet, OpaqueLeaf

__all__ = ["NUM_CLASSES", "BATCH", "build", "specs", "random_plan", "randomize"]

BATCH = 2


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
