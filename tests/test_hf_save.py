"""Native Hugging Face output (issue 13, item 5): ``compile(..., uniform=True)`` and
``fxprune.save_pretrained`` write a folder that ``AutoModel*.from_pretrained`` loads and
that computes what the slim model computes. Tiny configs, random weights, no hub."""
import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")

from hf_models import BERT, DECODER, tiny  # noqa: E402  (after the importorskip)


def _llama(cls="LlamaForCausalLM"):
    return tiny(cls, DECODER, use_cache=False)


def _bert(classes=3):
    return tiny("BertForSequenceClassification", BERT, num_labels=classes)


def _logits(out):
    return out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)


def _reload_matches(result, model, inputs, auto, tmp_path):
    folder = fxprune.save_pretrained(result, model, str(tmp_path / "slim"))
    back = auto.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        assert torch.allclose(_logits(back(*inputs)), _logits(result.module(*inputs)),
                              atol=1e-10)
    return back


@pytest.mark.parametrize("cls", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_gqa_decoder_round_trips_with_fewer_heads(cls, tmp_path):
    model, ids = _llama(cls), torch.randint(0, 64, (2, 8))
    result = fxprune.compile(model, "l2", (ids,), sparsity=0.5, progress=False)
    back = _reload_matches(result, model, (ids,), transformers.AutoModelForCausalLM, tmp_path)
    cfg = back.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, head_dim) == (16, 2, 1, 24, 8)
    assert back.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 11)
    assert model.config.num_attention_heads == 4   # the dense model is untouched


def test_uniform_flops_budget_keeps_equal_counts_per_layer(tmp_path):
    """uniform=True for equal counts per layer; round_to=4 keeps the hidden size a
    multiple of the head count, which Llama's config requires."""
    model, ids = _llama(), torch.randint(0, 64, (2, 8))
    result = fxprune.compile(model, "l2", (ids,), flops=0.6, uniform=True, round_to=4,
                             progress=False)
    assert result.report.flops_ratio <= 0.6 + 1e-9
    kept = {gid: len(k) for gid, k in result.plan.kept.items()}
    assert len({n for g, n in kept.items() if "mlp" in g}) == 1
    assert len({n for g, n in kept.items() if "self_attn" in g}) == 1
    _reload_matches(result, model, (ids,), transformers.AutoModelForCausalLM, tmp_path)


def test_non_uniform_plan_is_refused_with_the_fix(tmp_path):
    model, ids = _llama(), torch.randint(0, 64, (2, 8))
    result = fxprune.compile(model, "random", (ids,), flops=0.6, progress=False, seed=1)
    counts = {len(k) for g, k in result.plan.kept.items() if "mlp" in g}
    if len(counts) == 1:
        pytest.skip("this random plan happens to be uniform")
    with pytest.raises(fxprune.FxpruneError, match="uniform=True"):
        fxprune.save_pretrained(result, model, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_a_config_the_library_refuses_is_an_fxprune_error(tmp_path):
    model, ids = _llama(), torch.randint(0, 64, (2, 8))
    result = fxprune.compile(model, "l2", (ids,), flops=0.6, uniform=True, progress=False)
    hidden = len(result.plan.kept["model.embed_tokens"])
    heads = 2 * len(result.plan.kept["model.layers.0.self_attn.q_proj"])  # 2 queries per KV
    assert hidden % heads, "the plan this test needs: a hidden size the heads do not divide"
    with pytest.raises(fxprune.FxpruneError, match="round_to="):
        fxprune.save_pretrained(result, model, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_bert_classifier_round_trips(tmp_path):
    model = _bert()
    ids = torch.randint(0, 50, (2, 8))
    inputs = (ids, torch.ones_like(ids))
    result = fxprune.compile(model, "l2", inputs, sparsity=0.5, progress=False)
    back = _reload_matches(result, model, inputs,
                           transformers.AutoModelForSequenceClassification, tmp_path)
    assert back.config.intermediate_size == 32


def test_bert_heads_the_config_cannot_hold_are_refused(tmp_path):
    """BERT's head size is hidden_size / num_attention_heads: a slimmer stream with all
    heads kept has no config; the error says so instead of writing a broken folder."""
    model = _bert()
    ids = torch.randint(0, 50, (2, 8))
    heads = [g.id for g in fxprune.groups(model, (ids, torch.ones_like(ids)))
             if g.kind == "head"]
    result = fxprune.compile(model, "l2", (ids, torch.ones_like(ids)), sparsity=0.5,
                             ignore=heads, progress=False)
    with pytest.raises(fxprune.FxpruneError, match="hidden_size / num_attention_heads"):
        fxprune.save_pretrained(result, model, str(tmp_path / "x"))


def test_not_a_hugging_face_model_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    result = fxprune.compile(model, "l2", torch.randn(2, 4), sparsity=0.5, progress=False)
    with pytest.raises(fxprune.FxpruneError, match="PreTrainedModel"):
        fxprune.save_pretrained(result, model, str(tmp_path / "x"))


def test_uniform_misuse_is_a_budget_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(fxprune.BudgetError, match="steps="):
        fxprune.compile(model, "l2", torch.randn(2, 4), flops=0.5, uniform=True, steps=3)
    with pytest.raises(fxprune.BudgetError, match="True or False"):
        fxprune.compile(model, "l2", torch.randn(2, 4), flops=0.5, uniform="yes")
