"""More Hugging Face families through the whole pipeline (export front end, analysis,
l2 selection, rewrite, verification): tiny configs, random weights, no hub. Each family
must prune something, meet the budget and verify exact against the masked original."""
import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")

DEC = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ENC = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=48)
VIT = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
           num_attention_heads=4)

TEXT = {
    "MistralForCausalLM": DEC, "GemmaForCausalLM": dict(DEC, head_dim=8),
    "Gemma2ForCausalLM": dict(DEC, head_dim=8), "Phi3ForCausalLM": dict(DEC, pad_token_id=0),
    "Qwen3ForCausalLM": dict(DEC, head_dim=8), "OlmoForCausalLM": DEC,
    "MambaForCausalLM": dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4),
    "OPTForCausalLM": dict(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64,
                           word_embed_proj_dim=32),
    "GPTNeoXForCausalLM": dict(ENC, max_position_embeddings=64),
    "DistilBertForSequenceClassification": dict(vocab_size=64, dim=32, n_layers=2, n_heads=4,
                                                hidden_dim=48, max_position_embeddings=64),
    "StableLmForCausalLM": DEC, "Starcoder2ForCausalLM": DEC, "GraniteForCausalLM": DEC,
    "CohereForCausalLM": DEC, "Gemma3ForCausalLM": dict(DEC, head_dim=8),
    "Qwen2MoeForCausalLM": dict(DEC, moe_intermediate_size=16, num_experts=4,
                                num_experts_per_tok=2, shared_expert_intermediate_size=16),
    "MixtralForCausalLM": dict(DEC, num_local_experts=4, num_experts_per_tok=2),
    "PhiForCausalLM": dict(ENC, max_position_embeddings=64),
    "GPTJForCausalLM": dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            rotary_dim=4),
    "CodeGenForCausalLM": dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               rotary_dim=4),
    "BloomForCausalLM": dict(vocab_size=64, hidden_size=32, n_layer=2, n_head=4),
    "MptForCausalLM": dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
    "GPTNeoForCausalLM": dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                              attention_types=[[["global", "local"], 1]],
                              max_position_embeddings=64),
    "XLMRobertaForSequenceClassification": dict(ENC, max_position_embeddings=70),
    "DebertaV2ForSequenceClassification": dict(ENC, max_position_embeddings=64),
    "ModernBertForSequenceClassification": dict(ENC, max_position_embeddings=64, pad_token_id=0),
    "RobertaForSequenceClassification": dict(ENC, max_position_embeddings=70),
    "AlbertForSequenceClassification": dict(ENC, embedding_size=16),
    "ElectraForSequenceClassification": dict(ENC, embedding_size=16),
}
IMAGE = {
    "DeiTForImageClassification": dict(VIT, intermediate_size=48),
    "BeitForImageClassification": dict(VIT, intermediate_size=48),
    "Dinov2ForImageClassification": dict(VIT, mlp_ratio=2),
    "CLIPVisionModel": dict(VIT, intermediate_size=48),
    "ViTMAEModel": dict(VIT, intermediate_size=48),  # shuffles patches by torch.rand noise
    "SwinForImageClassification": dict(image_size=32, patch_size=4, embed_dim=16,
                                       depths=[1, 1], num_heads=[2, 4], window_size=4),
    "ConvNextForImageClassification": dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                           image_size=32),
    "ConvNextV2ForImageClassification": dict(num_stages=2, hidden_sizes=[8, 16],
                                             depths=[1, 1], image_size=32),
    "Swinv2ForImageClassification": dict(image_size=32, patch_size=4, embed_dim=16,
                                         depths=[1, 1], num_heads=[2, 4], window_size=4),
    "RegNetForImageClassification": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                         groups_width=8, image_size=32),
    "PoolFormerForImageClassification": dict(num_encoder_blocks=2, depths=[1, 1],
                                             hidden_sizes=[8, 16], patch_sizes=[7, 3],
                                             strides=[4, 2], padding=[2, 1], image_size=32),
    "LevitForImageClassification": dict(image_size=32, hidden_sizes=[16, 32, 48],
                                        num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
                                        key_dim=[8, 8, 8]),
    "MobileNetV2ForImageClassification": dict(image_size=32, depth_multiplier=0.25),
    "ResNetForImageClassification": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                         layer_type="basic", image_size=32),
    "MobileViTForImageClassification": dict(image_size=32, hidden_sizes=[16, 24, 32],
                                            neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32]),
    "SegformerForImageClassification": dict(num_encoder_blocks=2, depths=[1, 1],
                                            sr_ratios=[2, 1], hidden_sizes=[8, 16],
                                            num_attention_heads=[1, 2], patch_sizes=[7, 3],
                                            strides=[4, 2], mlp_ratios=[2, 2], image_size=32),
}


@pytest.mark.parametrize("name", sorted(TEXT) + sorted(IMAGE))
def test_family_compiles_exact_to_the_budget(name):
    torch.manual_seed(0)
    cls = getattr(transformers, name)
    config = TEXT.get(name) or IMAGE[name]
    size = config.get("image_size")
    model = cls(cls.config_class(**config)).eval()
    x = torch.randn(2, 3, size, size) if name in IMAGE else torch.randint(1, 60, (2, 8))
    report = fxprune.compile(model, "l2", (x,), flops=0.7, progress=False).report
    assert report.frontend == "export"
    assert report.max_rel_error is not None and report.max_rel_error < 1e-5
    assert 0.5 < report.flops_ratio <= 0.7 + 1e-9
    assert any(row.kept < row.size for row in report.groups)


@pytest.mark.parametrize("variant,heads_prunable", [
    (dict(), False),                                           # multi-query: one shared KV head
    (dict(multi_query=False), True),                           # fused per-head q, k, v
    (dict(new_decoder_architecture=True, num_kv_heads=2), True),  # KV groups, broadcast_to
])
def test_falcon_linears_and_heads(variant, heads_prunable):
    """Falcon's ``FalconLinear`` (``x @ w.T``, no bias) are layers; its fused
    ``query_key_value`` heads are prunable except with one shared key/value head, which
    is blocked with the op named."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, **variant)
    model = transformers.FalconForCausalLM(config).eval()
    x = torch.randint(1, 60, (2, 8))
    groups = {g.id: g for g in fxprune.groups(model, (x,))}
    assert groups["transformer.h.0.mlp.dense_h_to_4h"].prunable
    heads = groups["transformer.h.0.self_attention.query_key_value"]
    assert heads.kind == "head" and heads.prunable == heads_prunable
    if not heads_prunable:
        # the op that first meets the shared head depends on the transformers version (a
        # gather where this test was written, a multiply in 5.25): the reason names it
        assert "gather along channels" in heads.reason or "at node `mul" in heads.reason, \
            heads.reason
    res = fxprune.compile(model, "l2", (x,), flops=0.7, progress=False)
    assert res.report.max_rel_error < 1e-5 and res.report.flops_ratio <= 0.7 + 1e-9
    assert isinstance(res.module.get_submodule("transformer.h.0.mlp.dense_4h_to_h"),
                      torch.nn.Linear)


SEQ2SEQ = {
    "T5ForConditionalGeneration": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                       num_heads=4, decoder_start_token_id=0),
    "BartForConditionalGeneration": dict(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, max_position_embeddings=64),
    "WhisperForConditionalGeneration": dict(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
        decoder_start_token_id=0, pad_token_id=0),
}


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_encoder_decoder_compiles_exact_from_keyword_inputs(name):
    torch.manual_seed(0)
    cls = getattr(transformers, name)
    model = cls(cls.config_class(**SEQ2SEQ[name])).eval()
    source = ({"input_features": torch.randn(2, 8, 32)} if name.startswith("Whisper")
              else {"input_ids": torch.randint(1, 60, (2, 8))})
    inputs = {**source, "decoder_input_ids": torch.randint(1, 60, (2, 5))}
    report = fxprune.compile(model, "l2", inputs, flops=0.7, progress=False).report
    assert report.max_rel_error < 1e-5 and 0.5 < report.flops_ratio <= 0.7 + 1e-9
    assert any(row.kept < row.size for row in report.groups)
