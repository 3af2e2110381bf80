"""Helpers of the golden-group tests (test_groups*.py): analyse a fixture and compare
its groups with expectations written member by member."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

import fxprune
from fxprune.models import create_model, model_input_size


def analysed(name: str, dtype=torch.float32, **kwargs):
    """(model, example input, {group id: group}) for a registered fixture."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).to(dtype).eval()
    x = torch.randn(2, *model_input_size(name), dtype=dtype)
    return model, x, {g.id: g for g in fxprune.groups(model, x)}


def ident(n: int, offset: int = 0, per: int = 1) -> List[List[int]]:
    """``n`` channels owning ``per`` consecutive indices each, starting at ``offset``."""
    return [list(range(offset + c * per, offset + (c + 1) * per)) for c in range(n)]


def prod(target: str, idx, dim: int = 0):
    return {(target, dim): ("producer", idx)}


def cons(target: str, idx, dim: int = 1):
    return {(target, dim): ("consumer", idx)}


def bias(target: str, idx):
    return {(target, 0): ("bias", idx)}


def tensor(target: str, dim: int, idx):
    return {(target, dim): ("tensor", idx)}


def bn(prefix: str, idx):
    """A BatchNorm's affine parameters and running statistics."""
    return {(f"{prefix}.{p}", 0): ("norm", idx)
            for p in ("weight", "bias", "running_mean", "running_var")}


def ln(prefix: str, idx):
    return {(f"{prefix}.{p}", 0): ("norm", idx) for p in ("weight", "bias")}


def conv_bn(prefix: str, n: int, idx=None):
    """Producer rows of ``prefix.0`` (Conv2d, no bias) and its BatchNorm ``prefix.1``."""
    idx = ident(n) if idx is None else idx
    return {**prod(f"{prefix}.0.weight", idx), **bn(f"{prefix}.1", idx)}


def merge(*parts) -> Dict[Tuple[str, int], Tuple[str, list]]:
    out: dict = {}
    for p in parts:
        assert not set(p) & set(out), f"duplicate member in expectation: {set(p) & set(out)}"
        out.update(p)
    return out


def members_of(group) -> Dict[Tuple[str, int], Tuple[str, list]]:
    out = {}
    for m in group.members:
        assert (m.target, m.dim) not in out, f"{group.id}: {m.target} dim {m.dim} listed twice"
        assert len(m.index_map) == group.size, f"{group.id}: {m.target} index_map length"
        out[(m.target, m.dim)] = (m.role, [list(ix) for ix in m.index_map])
    return out


def check_groups(groups: Dict[str, "fxprune.Group"], expected: List[tuple]) -> None:
    """``expected``: (id, size, kind, prunable, members) in analysis order."""
    assert list(groups) == [e[0] for e in expected]
    for gid, size, kind, prunable, members in expected:
        g = groups[gid]
        assert (g.size, g.kind, g.prunable) == (size, kind, prunable), f"group {gid}: {g}"
        assert g.prunable == (g.reason is None), f"group {gid}: reason {g.reason!r}"
        got = members_of(g)
        assert set(got) == set(members), (
            f"group {gid}: missing {sorted(set(members) - set(got))}, "
            f"unexpected {sorted(set(got) - set(members))}")
        for key, want in members.items():
            assert got[key] == want, f"group {gid} member {key}: got {got[key]}, want {want}"


def classifier(gid: str, target: str, n: int = 10) -> tuple:
    """The classifier: its outputs reach the model output, so it is never pruned."""
    return (gid, n, "channel", False, merge(prod(f"{target}.weight", ident(n)),
                                            bias(f"{target}.bias", ident(n))))


def qkv_rows(head: int, heads: int = 2, head_dim: int = 8) -> List[int]:
    """Rows of a fused qkv Linear owned by one head: head_dim rows of each of q, k, v."""
    dim = heads * head_dim
    return [part * dim + head * head_dim + j for part in range(3) for j in range(head_dim)]


def attention_group(prefix: str) -> tuple:
    heads = [qkv_rows(0), qkv_rows(1)]
    return (f"{prefix}.qkv", 2, "head", True, merge(
        prod(f"{prefix}.qkv.weight", heads), bias(f"{prefix}.qkv.bias", heads),
        cons(f"{prefix}.proj.weight", ident(2, per=8))))
