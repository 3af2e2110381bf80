"""Golden groups of the Hugging Face families that tests/test_export_hf.py does not pin
(BertModel and Llama are there): the BERT classifier (its residual stream reaches no
output, so it is prunable, with the pooler), ViT (heads, MLP units, the stream with the
class token and position embeddings) and Qwen2's grouped-query heads with their q/k/v
biases. Concrete members, dims and index maps. Tiny configs, random weights, no hub."""
import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")

from hf_models import BERT, DECODER, VIT, tiny  # noqa: E402  (after the importorskip)


def _groups(model, inputs):
    return {g.id: g for g in fxprune.groups(model, inputs)}


def _members(group):
    """``{target: (dim, index_map)}`` (below, ``rows`` are members sliced along dim 0,
    ``cols`` along dim 1: an embedding's columns are its output features)."""
    return {m.target: (m.dim, m.index_map) for m in group.members}


def _units(n):
    return [[c] for c in range(n)]


def _heads(n, size):
    return [list(range(h * size, (h + 1) * size)) for h in range(n)]


def _ids(vocab):
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_bert_classifier_stream_pooler_heads_and_mlp():
    model = tiny("BertForSequenceClassification", BERT, num_hidden_layers=1, num_labels=3)
    groups = _groups(model, _ids(50))
    assert set(groups) == {"bert.embeddings.word_embeddings",
                           "bert.encoder.layer.0.attention.self.query",
                           "bert.encoder.layer.0.intermediate.dense", "bert.pooler.dense",
                           "classifier"}
    e, l0 = "bert.embeddings.", "bert.encoder.layer.0."
    stream = groups[e + "word_embeddings"]
    assert (stream.kind, stream.size, stream.prunable) == ("stream", 32, True)
    cols = {e + "word_embeddings.weight", e + "position_embeddings.weight",
            e + "token_type_embeddings.weight", l0 + "attention.self.query.weight",
            l0 + "attention.self.key.weight", l0 + "attention.self.value.weight",
            l0 + "intermediate.dense.weight", "bert.pooler.dense.weight"}
    rows = {e + "LayerNorm.weight", e + "LayerNorm.bias",
            l0 + "attention.output.dense.weight", l0 + "attention.output.dense.bias",
            l0 + "attention.output.LayerNorm.weight", l0 + "attention.output.LayerNorm.bias",
            l0 + "output.dense.weight", l0 + "output.dense.bias",
            l0 + "output.LayerNorm.weight", l0 + "output.LayerNorm.bias"}
    assert _members(stream) == {**{t: (1, _units(32)) for t in cols},
                                **{t: (0, _units(32)) for t in rows}}
    heads = groups[l0 + "attention.self.query"]
    assert (heads.kind, heads.size, heads.prunable) == ("head", 4, True)
    qkv = [l0 + f"attention.self.{n}.{p}" for n in ("query", "key", "value")
           for p in ("weight", "bias")]
    assert _members(heads) == {**{t: (0, _heads(4, 8)) for t in qkv},
                               l0 + "attention.output.dense.weight": (1, _heads(4, 8))}
    mlp = groups[l0 + "intermediate.dense"]
    assert _members(mlp) == {l0 + "intermediate.dense.weight": (0, _units(64)),
                             l0 + "intermediate.dense.bias": (0, _units(64)),
                             l0 + "output.dense.weight": (1, _units(64))}
    pooler = groups["bert.pooler.dense"]
    assert pooler.prunable and _members(pooler) == {
        "bert.pooler.dense.weight": (0, _units(32)), "bert.pooler.dense.bias": (0, _units(32)),
        "classifier.weight": (1, _units(32))}
    head = groups["classifier"]
    assert not head.prunable and "output" in head.reason


def test_vit_stream_heads_and_mlp():
    model = tiny("ViTForImageClassification", VIT, num_labels=5)
    x = {"pixel_values": torch.randn(2, 3, 16, 16, dtype=torch.float64)}
    groups = _groups(model, x)
    v, l0 = "vit.embeddings.", "vit.layers.0."
    assert set(groups) == {v + "patch_embeddings.projection", l0 + "attention.q_proj",
                           l0 + "mlp.fc1", "classifier"}
    stream = groups[v + "patch_embeddings.projection"]
    assert (stream.kind, stream.size, stream.prunable) == ("stream", 32, True)
    rows = {v + "patch_embeddings.projection.weight", v + "patch_embeddings.projection.bias",
            l0 + "attention.o_proj.weight", l0 + "attention.o_proj.bias",
            l0 + "mlp.fc2.weight", l0 + "mlp.fc2.bias"} | {
        f"{n}.{p}" for n in (l0 + "layernorm_before", l0 + "layernorm_after", "vit.layernorm")
        for p in ("weight", "bias")}
    cols = {l0 + "attention.q_proj.weight", l0 + "attention.k_proj.weight",
            l0 + "attention.v_proj.weight", l0 + "mlp.fc1.weight", "classifier.weight"}
    assert _members(stream) == {v + "cls_token": (2, _units(32)),
                                v + "position_embeddings": (2, _units(32)),
                                **{t: (0, _units(32)) for t in rows},
                                **{t: (1, _units(32)) for t in cols}}
    heads = groups[l0 + "attention.q_proj"]
    assert (heads.kind, heads.size, heads.prunable) == ("head", 4, True)
    qkv = [l0 + f"attention.{n}_proj.{p}" for n in "qkv" for p in ("weight", "bias")]
    assert _members(heads) == {**{t: (0, _heads(4, 8)) for t in qkv},
                               l0 + "attention.o_proj.weight": (1, _heads(4, 8))}
    assert _members(groups[l0 + "mlp.fc1"]) == {
        l0 + "mlp.fc1.weight": (0, _units(48)), l0 + "mlp.fc1.bias": (0, _units(48)),
        l0 + "mlp.fc2.weight": (1, _units(48))}
    assert not groups["classifier"].prunable


def test_qwen2_gqa_group_is_a_kv_head_with_its_queries_and_biases():
    """4 query heads read 2 KV heads (head size 8): a channel is one KV head (8 rows of
    k_proj and v_proj, weights and biases) with its 2 query heads (16 rows of q_proj,
    16 columns of o_proj). The stream reaches the LM head's input columns."""
    model = tiny("Qwen2ForCausalLM", DECODER, num_hidden_layers=1)
    groups = _groups(model, _ids(64))
    a, m = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert set(groups) == {"model.embed_tokens", a + "q_proj", m + "gate_proj", "lm_head"}
    kv = groups[a + "q_proj"]
    assert (kv.kind, kv.size, kv.prunable) == ("head", 2, True)
    assert _members(kv) == {
        a + "q_proj.weight": (0, _heads(2, 16)), a + "q_proj.bias": (0, _heads(2, 16)),
        a + "k_proj.weight": (0, _heads(2, 8)), a + "k_proj.bias": (0, _heads(2, 8)),
        a + "v_proj.weight": (0, _heads(2, 8)), a + "v_proj.bias": (0, _heads(2, 8)),
        a + "o_proj.weight": (1, _heads(2, 16))}
    assert _members(groups[m + "gate_proj"]) == {
        m + "gate_proj.weight": (0, _units(48)), m + "up_proj.weight": (0, _units(48)),
        m + "down_proj.weight": (1, _units(48))}
    stream = groups["model.embed_tokens"]
    assert (stream.kind, stream.prunable) == ("stream", True)
    rows = {"model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight", "model.norm.weight",
            a + "o_proj.weight", m + "down_proj.weight"}
    cols = {"model.embed_tokens.weight", a + "q_proj.weight", a + "k_proj.weight",
            a + "v_proj.weight", m + "gate_proj.weight", m + "up_proj.weight",
            "lm_head.weight"}
    assert _members(stream) == {**{t: (0, _units(32)) for t in rows},
                                **{t: (1, _units(32)) for t in cols}}
    assert not groups["lm_head"].prunable
