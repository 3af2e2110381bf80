"""Connectivity (design §4): series / parallel / None between parameter layers.

Hand-derived expectations on small modules and fixtures, plus a brute-force oracle that
applies the definition with networkx path queries to every pair of layers of every
fixture.
"""
from __future__ import annotations

import itertools
import operator

import networkx as nx
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.models import create_model, list_models, model_input_size

FIXTURES = [name for name in list_models() if name.startswith("tiny_")]


def conn_of(model: nn.Module, x: torch.Tensor) -> "fxprune.Connectivity":
    return fxprune.connectivity(model, x)


def assert_kind(conn, a: str, b: str, kind) -> None:
    """``kind`` in both orders (the relation is symmetric)."""
    assert conn.kind(a, b) == kind, f"kind({a}, {b}) = {conn.kind(a, b)}, want {kind}"
    assert conn.kind(b, a) == kind, f"kind({b}, {a}) = {conn.kind(b, a)}, want {kind}"


# --------------------------------------------------------------------------- small modules
class SeparateQKV(nn.Module):
    """Embedding Linear, separate q/k/v projections, 2 heads, proj, mean, head."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.embed = nn.Linear(dim, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def split(self, t):
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.hd).transpose(1, 2)

    def forward(self, x):
        b, n, d = x.shape
        h = self.embed(x)
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        p = (q @ k.transpose(-2, -1) * self.hd ** -0.5).softmax(dim=-1)
        o = (p @ v).transpose(1, 2).reshape(b, n, d)
        return self.head(self.proj(o).mean(1))


def test_separate_qkv_projections_are_parallel():
    """Q·Kᵀ makes q and k parallel; P·V (P = softmax(Q·Kᵀ)) makes q-v and k-v parallel."""
    conn = conn_of(SeparateQKV(), torch.randn(2, 5, 8))
    assert conn.layers == ["embed", "q", "k", "v", "proj", "head"]
    for a, b in [("q", "k"), ("q", "v"), ("k", "v")]:
        assert_kind(conn, a, b, "parallel")
    for a in ("q", "k", "v"):
        assert_kind(conn, "embed", a, "series")
        assert_kind(conn, a, "proj", "series")
        assert_kind(conn, a, "head", "series")
    assert_kind(conn, "proj", "head", "series")
    assert_kind(conn, "embed", "head", "series")
    assert sorted(conn.pairs("parallel")) == [("k", "v"), ("q", "k"), ("q", "v")]


def test_scaled_dot_product_attention_is_a_product():
    class SDPA(SeparateQKV):
        def forward(self, x):
            b, n, d = x.shape
            h = self.embed(x)
            q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
            o = nn.functional.scaled_dot_product_attention(q, k, v)
            return self.head(self.proj(o.transpose(1, 2).reshape(b, n, d)).mean(1))

    conn = conn_of(SDPA(), torch.randn(2, 5, 8))
    for a, b in [("q", "k"), ("q", "v"), ("k", "v")]:
        assert_kind(conn, a, b, "parallel")
    assert_kind(conn, "v", "proj", "series")


class Branches(nn.Module):
    """Two sibling branches meeting at ``combine`` (add, cat, or a gating product)."""

    def __init__(self, combine: str):
        super().__init__()
        self.combine = combine
        self.stem = nn.Linear(4, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.out = nn.Linear(12 if combine == "cat" else 6, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        a, b = self.a(h), self.b(h)
        if self.combine == "add":
            y = a + b
        elif self.combine == "cat":
            y = torch.cat([a, b], dim=1)
        else:
            y = a * torch.sigmoid(b)
        return self.out(y)


@pytest.mark.parametrize("combine, kind", [("add", None), ("cat", None), ("gate", "parallel")])
def test_siblings_meeting_at(combine, kind):
    """Siblings that only meet by addition or concatenation have no block; a gating
    product of two activations makes them parallel."""
    conn = conn_of(Branches(combine), torch.randn(3, 4))
    assert_kind(conn, "a", "b", kind)
    for layer in ("a", "b"):
        assert_kind(conn, "stem", layer, "series")
        assert_kind(conn, layer, "out", "series")


def test_product_with_a_constant_is_not_parallel():
    """``x * scale`` (a Python constant) or ``x * x`` of one layer's output relates nothing."""
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x) * 0.5
            return self.b(y * y)

    conn = conn_of(Square(), torch.randn(2, 4))
    assert conn.layers == ["a", "b"]
    assert_kind(conn, "a", "b", "series")
    assert not list(conn.pairs("parallel"))


def test_a_layer_with_itself_is_none_and_unknown_names_raise():
    conn = conn_of(SeparateQKV(), torch.randn(2, 5, 8))
    for layer in conn.layers:
        assert conn.kind(layer, layer) is None
    with pytest.raises(KeyError, match="not a parameter layer"):
        conn.kind("q", "nonexistent")
    assert "6 parameter layers" in conn.table()


def test_functional_layer_and_parameter_product_are_layers():
    """F.linear with a parameter weight is named after the weight's owner; a node that
    multiplies a parameter by an activation (LayerScale) is a layer named by its node."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.gamma = nn.Parameter(torch.ones(4))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            y = nn.functional.linear(x, self.fc.weight, self.fc.bias)
            return self.out(self.gamma * y)

    conn = conn_of(Functional(), torch.randn(2, 4))
    assert conn.layers == ["fc", "mul", "out"]
    assert_kind(conn, "fc", "mul", "series")
    assert_kind(conn, "mul", "out", "series")


# --------------------------------------------------------------------------- fixtures
def fixture_conn(name: str):
    model = create_model(name).eval()
    return conn_of(model, torch.randn(2, *model_input_size(name)))


def test_fixture_relations():
    resnet = fixture_conn("tiny_resnet")
    assert_kind(resnet, "layer2.conv2", "layer2.shortcut.0", None)  # meet at the add
    assert_kind(resnet, "layer1.conv1", "layer2.conv1", "series")
    assert_kind(resnet, "stem.0", "head.fc", "series")
    dense = fixture_conn("tiny_densenet")
    assert_kind(dense, "block1.0.conv", "block1.1.conv", "series")  # through the concat
    assert_kind(dense, "block1.0.conv", "transition.2", "series")
    split = fixture_conn("tiny_split")
    assert_kind(split, "branch_a.0", "branch_c.0", None)  # meet at the cat
    assert_kind(split, "branch_c.0", "fuse.0", "series")
    vit = fixture_conn("tiny_vit")
    assert vit.kind("blocks.0.attn.qkv", "blocks.0.attn.qkv") is None  # fused Q·Kᵀ: self
    assert_kind(vit, "blocks.0.attn.qkv", "blocks.0.attn.proj", "series")
    assert_kind(vit, "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "series")
    assert not list(vit.pairs("parallel"))
    se = fixture_conn("tiny_se")
    assert_kind(se, "conv.0", "se.fc2", "series")  # the gate is computed from conv's output
    assert_kind(se, "se.fc1", "head.fc", "series")


# --------------------------------------------------------------------------- oracle
_PRODUCTS = {operator.mul, operator.matmul, torch.mul, torch.matmul, torch.bmm, torch.einsum,
             nn.functional.scaled_dot_product_attention}


def oracle(model: nn.Module, x: torch.Tensor, layers):
    """The definition, by path queries on the FX graph: {(a, b): kind} for a < b."""
    gm = torch.fx.symbolic_trace(model)
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node)
        for inp in node.all_input_nodes:
            graph.add_edge(inp, node)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    nodes.update({n.name: n for n in gm.graph.nodes if n.name in layers and n.op != "call_module"})
    reach = {layer: nx.descendants(graph, nodes[layer]) | {nodes[layer]} for layer in layers}
    live = {n for n in graph if any(p.op == "placeholder" for p in nx.ancestors(graph, n) | {n})}
    products = [n for n in gm.graph.nodes
                if (n.op == "call_function" and n.target in _PRODUCTS
                    or n.op == "call_method" and n.target in ("mul", "matmul", "bmm"))
                and n.name not in layers]
    out = {}
    for a, b in itertools.combinations(layers, 2):
        if nodes[b] in reach[a] or nodes[a] in reach[b]:
            out[(a, b)] = "series"
            continue
        out[(a, b)] = None
        for p in products:
            ops = [o for o in p.all_input_nodes if o in live]
            for u, v in itertools.permutations(ops, 2):
                if u in reach[a] and v in reach[b]:
                    out[(a, b)] = "parallel"
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_fixtures_match_the_definition(name):
    model = create_model(name).eval()
    x = torch.randn(2, *model_input_size(name))
    conn = conn_of(model, x)
    expected_layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert set(expected_layers) <= set(conn.layers)
    want = oracle(model, x, conn.layers)
    got = {(a, b): conn.kind(a, b) for a, b in itertools.combinations(conn.layers, 2)}
    assert got == want
    assert all(conn.kind(b, a) == k for (a, b), k in got.items())


@pytest.mark.parametrize("make", [SeparateQKV, lambda: Branches("gate"), lambda: Branches("add")])
def test_small_modules_match_the_definition(make):
    model = make()
    x = torch.randn(2, 5, 8) if isinstance(model, SeparateQKV) else torch.randn(3, 4)
    conn = conn_of(model, x)
    want = oracle(model, x, conn.layers)
    assert {(a, b): conn.kind(a, b) for a, b in itertools.combinations(conn.layers, 2)} == want


# --------------------------------------------------------------------------- within-layer
class FusedQKV(SeparateQKV):
    """The same attention with one fused qkv Linear, and a shape read off its input."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__(dim, heads)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        h = self.embed(x)
        b, n, d = h.shape  # a shape query: no value of embed reaches the products
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        p = (q @ k.transpose(-2, -1) * self.hd ** -0.5).softmax(dim=-1)
        o = (p @ v).transpose(1, 2).reshape(b, n, d)
        return self.head(self.proj(o).mean(1))


def test_fused_qkv_has_a_within_layer_parallel_term():
    """Q·Kᵀ of one fused qkv is a product inside one layer: reported in ``within`` and in
    the table, while ``kind(qkv, qkv)`` stays None (design §4)."""
    conn = conn_of(FusedQKV(), torch.randn(2, 5, 8))
    assert conn.within == ["qkv"]
    assert conn.kind("qkv", "qkv") is None and not list(conn.pairs("parallel"))
    assert "1 within-layer parallel terms" in conn.table() and "qkv" in conn.table()


def test_plain_mlp_and_separate_projections_have_no_within_layer_term():
    """An MLP multiplies no two activations; separate q/k/v are parallel *pairs*."""
    mlp = conn_of(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
    assert mlp.within == [] and "0 within-layer parallel terms" in mlp.table()
    assert conn_of(SeparateQKV(), torch.randn(2, 5, 8)).within == []


def within_oracle(model: nn.Module, layers) -> set:
    """Layers with a path to two distinct live operands of one product, in the FX graph
    without the other layers and without shape queries (nx path queries)."""
    gm = torch.fx.symbolic_trace(model)
    graph = nx.DiGraph([(i, n) for n in gm.graph.nodes for i in n.all_input_nodes])
    graph.add_nodes_from(gm.graph.nodes)
    shape = set()
    for n in gm.graph.nodes:  # topological: x.shape, x.size(), and ints computed from them
        if (n.op == "call_method" and n.target in ("size", "dim", "numel")
                or n.op == "call_function" and n.target is getattr and n.args[1] == "shape"
                or n.op == "call_function" and n.all_input_nodes
                and set(n.all_input_nodes) <= shape):
            shape.add(n)
    node_of = {n.target if n.op == "call_module" else n.name: n for n in gm.graph.nodes}
    live = {n for n in graph if any(p.op == "placeholder" for p in nx.ancestors(graph, n) | {n})}
    products = [n for n in gm.graph.nodes
                if (n.op == "call_function" and n.target in _PRODUCTS
                    or n.op == "call_method" and n.target in ("mul", "matmul", "bmm"))
                and n.name not in layers]
    found = set()
    for layer in layers:
        sub = graph.copy()
        sub.remove_nodes_from(shape | {node_of[m] for m in layers if m != layer})
        reach = nx.descendants(sub, node_of[layer])
        for p in products:
            if len([o for o in p.all_input_nodes if o in live and o in reach]) >= 2:
                found.add(layer)
    return found


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_attention", "tiny_se", "tiny_mlp"])
def test_within_layer_terms_match_the_definition(name):
    model = create_model(name).eval()
    conn = conn_of(model, torch.randn(2, *model_input_size(name)))
    assert set(conn.within) == within_oracle(model, conn.layers)
    assert bool(conn.within) == (name in ("tiny_vit", "tiny_attention"))


def test_fused_qkv_module_matches_the_within_oracle():
    model = FusedQKV()
    assert conn_of(model, torch.randn(2, 5, 8)).within == sorted(within_oracle(model, ["embed",
                                                                 "qkv", "proj", "head"]))
