"""Hugging Face transformers through the torch.export front end (chosen automatically:
transformers 5.x has no torch.fx tracer). Tiny configs, random weights, no hub."""
import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")

from hf_models import BERT, DECODER, tiny  # noqa: E402  (after the importorskip)


def _bert():
    return tiny("BertModel", BERT)


def _llama(layers=2):
    return tiny("LlamaForCausalLM", DECODER, num_hidden_layers=layers, use_cache=False)


def _ids(batch=2, seq=8, vocab=50):
    return torch.randint(0, vocab, (batch, seq))


def test_bert_groups_heads_and_mlp_units():
    model, ids = _bert(), _ids()
    groups = {g.id: g for g in fxprune.groups(model, (ids, torch.ones_like(ids)))}
    p = "encoder.layer.{}."
    for layer in (0, 1):
        heads = groups[p.format(layer) + "attention.self.query"]
        assert (heads.size, heads.kind, heads.prunable) == (4, "head", True)
        assert {m.target for m in heads.members} == {
            p.format(layer) + f"attention.{n}" for n in (
                "self.query.weight", "self.query.bias", "self.key.weight", "self.key.bias",
                "self.value.weight", "self.value.bias", "output.dense.weight")}
        assert all(len(i) == 8 for m in heads.members for i in m.index_map)  # head_dim
        mlp = groups[p.format(layer) + "intermediate.dense"]
        assert (mlp.size, mlp.prunable) == (64, True)
    stream = groups["embeddings.word_embeddings"]
    assert stream.kind == "stream" and not stream.prunable  # last_hidden_state is an output


def test_bert_compile_l2_is_exact():
    model, ids = _bert(), _ids()
    mask = torch.ones_like(ids)
    result = fxprune.compile(model, "l2", (ids, mask), flops=0.6, progress=False)
    assert result.report.frontend == "export" and result.report.max_rel_error < 1e-6
    assert result.report.flops_after < 0.62 * result.report.flops_before
    out = result.module(ids, mask)
    assert out["last_hidden_state"].shape == (2, 8, 32)


def test_llama_gqa_groups_take_query_heads_with_their_kv_head():
    model, ids = _llama(layers=1), _ids(vocab=64)
    groups = {g.id: g for g in fxprune.groups(model, (ids,))}
    kv = groups["model.layers.0.self_attn.q_proj"]
    assert (kv.size, kv.kind, kv.prunable) == (2, "head", True)  # 2 KV heads, 4 query heads
    maps = {m.target: m.index_map for m in kv.members}
    assert maps["model.layers.0.self_attn.q_proj.weight"] == [list(range(16)), list(range(16, 32))]
    assert maps["model.layers.0.self_attn.k_proj.weight"] == [list(range(8)), list(range(8, 16))]
    assert maps["model.layers.0.self_attn.v_proj.weight"] == [list(range(8)), list(range(8, 16))]
    assert maps["model.layers.0.self_attn.o_proj.weight"] == [list(range(16)), list(range(16, 32))]
    mlp = groups["model.layers.0.mlp.gate_proj"]
    assert mlp.size == 48 and mlp.prunable
    assert {m.target for m in mlp.members} >= {"model.layers.0.mlp.up_proj.weight",
                                               "model.layers.0.mlp.down_proj.weight"}
    # RMSNorm's mean square over the hidden size is a statistic taken over the kept
    # channels (passes/statistics.py): the residual stream is prunable, with every
    # RMSNorm weight, the embedding and the LM head's input columns
    stream = groups["model.embed_tokens"]
    assert (stream.kind, stream.prunable, stream.size) == ("stream", True, 32)
    dims = {m.target: m.dim for m in stream.members}
    assert dims["lm_head.weight"] == 1 and dims["model.embed_tokens.weight"] == 1
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight"} <= set(dims)


def test_llama_compile_l2_is_exact_at_any_batch_and_length():
    model, ids = _llama(), _ids(vocab=64)
    result = fxprune.compile(model, "l2", (ids,), flops=0.7, progress=False)
    assert result.report.frontend == "export" and result.report.max_rel_error < 1e-6
    slim = result.module
    assert slim.get_submodule("model.layers.1.self_attn.k_proj").weight.shape[0] % 8 == 0
    for batch, seq in ((1, 5), (4, 11)):
        x = _ids(batch, seq, vocab=64)
        assert slim(x)["logits"].shape == (batch, seq, 64)


def test_llama_slim_pt2_round_trip_at_two_batches_and_lengths(tmp_path):
    from fxprune.passes.export_capture import export_dynamic
    model, ids = _llama(layers=1), _ids(vocab=64)
    slim = fxprune.compile(model, "l2", (ids,), flops=0.7, progress=False).module
    capture = export_dynamic(slim, (ids,))
    assert capture.free == ("batch", "seq")
    path = str(tmp_path / "slim.pt2")
    torch.export.save(capture.program, path)
    loaded = torch.export.load(path).module()
    for batch, seq in ((1, 5), (4, 11)):
        x = _ids(batch, seq, vocab=64)
        torch.testing.assert_close(loaded(x)["logits"], slim(x)["logits"])
