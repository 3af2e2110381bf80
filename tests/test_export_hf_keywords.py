"""Hugging Face batches as dicts of keyword inputs (issue 13, item 4): labels are the
targets, the loss is the model's own (``ModelOutput``s need no ``output_fn``), a decoder
with its KV cache on (``use_cache`` left at its default) captures, and data criteria run
through compile with verification. Tiny configs, random weights, no hub."""
import pytest
import torch

import fxprune
from fxprune.passes.keyword_inputs import KeywordInputs, keyword_inputs
from fxprune.passes.score import example_input_tuple, prepare_batches, wrap_loss

transformers = pytest.importorskip("transformers")

from hf_models import BERT, DECODER, VIT, tiny  # noqa: E402  (after the importorskip)


def _bert_cls(labels=3):
    return tiny("BertForSequenceClassification", BERT, num_hidden_layers=1,
                intermediate_size=48, num_labels=labels)


def _vit():
    return tiny("ViTForImageClassification", VIT, num_labels=5)


def _qwen2():
    # use_cache stays at its default (True): the capture turns it off
    return tiny("Qwen2ForCausalLM", DECODER, num_hidden_layers=1)


def _text(seed, batch=4, seq=8, vocab=50, labels=3, pad=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -3:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["labels"] = torch.randint(0, labels, (batch,), generator=g)
    return out


def _images(seed, batch=4):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g, dtype=torch.float64),
            "labels": torch.randint(0, 5, (batch,), generator=g)}


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _scoring_loss(model, data):
    """The loss the criteria see on the first batch, with fxprune's batch handling."""
    batch_list = prepare_batches(data)
    example = example_input_tuple(None, batch_list, model)
    inputs, targets = batch_list[0]
    return wrap_loss(None, None, model)(model(**inputs.as_kwargs()), targets), example


@pytest.mark.parametrize("make, batch", [(_bert_cls, _text(0)), (_vit, _images(0))])
def test_default_loss_is_the_models_own_loss(make, batch):
    model = make()
    loss, example = _scoring_loss(model, [batch])
    torch.testing.assert_close(loss, model(**batch).loss)
    assert isinstance(example, KeywordInputs) and "labels" not in example.names


def test_causal_lm_without_labels_scores_the_next_token_loss():
    """No labels: a causal LM's targets are its input ids with the padding ignored, so
    the loss is the model's own ``labels=input_ids`` loss (next-token cross-entropy)."""
    model = _qwen2()
    batch = _text(0, batch=2, vocab=64, labels=0, pad=True)
    loss, _ = _scoring_loss(model, [batch])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.testing.assert_close(loss, model(**batch, labels=labels).loss)
    unmasked = model(**batch, labels=batch["input_ids"]).loss
    assert not torch.allclose(loss, unmasked)  # the padded positions are not scored


def test_classifier_without_labels_scores_its_own_prediction():
    model = _bert_cls()
    batch = _inputs(_text(1))
    loss, _ = _scoring_loss(model, [batch])
    logits = model(**batch).logits
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(
        logits, logits.argmax(-1)))


def test_keyword_inputs_follow_the_forward_order():
    model, batch = _bert_cls(), _text(0)
    given = {"attention_mask": batch["attention_mask"], "input_ids": batch["input_ids"],
             "labels": batch["labels"], "output_hidden_states": False, "token_type_ids": None}
    ordered = keyword_inputs(model, given)
    assert ordered.names == ("input_ids", "attention_mask")
    assert ordered.constants == {"output_hidden_states": False}
    assert ordered[0] is batch["input_ids"]


def test_keyword_mistakes_say_what_to_do():
    model = _bert_cls()
    with pytest.raises(fxprune.DataError, match="same keys"):
        fxprune.compile(model, "taylor", data=[_text(0), _inputs(_text(1)) | {
            "token_type_ids": torch.zeros(4, 8, dtype=torch.long)}], flops=0.7)
    with pytest.raises(fxprune.DataError, match="no keyword input 'y'"):
        fxprune.groups(torch.nn.Linear(4, 2), {"y": torch.randn(2, 4)})
    with pytest.raises(fxprune.FxpruneError, match="frontend='export'"):
        fxprune.groups(model, {"attention_mask": torch.ones(2, 8, dtype=torch.long)},
                       frontend="fx")


def test_plain_dict_outputs_still_need_output_fn():
    """Only a Hugging Face model's outputs are read for their logits: a plain module's
    dict could hold anything."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc(x)}

    loss = wrap_loss(None, None, Net())
    with pytest.raises(fxprune.DataError, match="output_fn"):
        loss({"logits": torch.randn(2, 3)}, torch.tensor([0, 1]))


def test_bert_classifier_dict_batches_with_labels_compile_and_replay():
    model = _bert_cls()
    data = [_text(0), _text(1)]
    res = fxprune.compile(model, "taylor", data=data, flops=0.7, repair=None, progress=False)
    assert res.report.frontend == "export" and res.report.max_rel_error < 1e-6
    assert res.report.flops_after < 0.72 * res.report.flops_before
    inputs = _inputs(data[1])
    assert res.module(**inputs)["logits"].shape == (4, 3)  # keyword call, no labels
    again = fxprune.apply_plan(model, res.plan, inputs, repair=None)
    torch.testing.assert_close(again.module(**inputs)["logits"],
                               res.module(**inputs)["logits"])


def test_vit_pixel_values_and_labels_compile_with_obs():
    model = _vit()
    data = [_images(0, batch=8), _images(1, batch=8)]
    res = fxprune.compile(model, "obs", data=data, flops=0.7, progress=False)
    assert res.report.frontend == "export" and res.report.max_rel_error < 1e-6
    assert res.report.flops_after < 0.72 * res.report.flops_before
    # the residual stream (LayerNorm statistics over kept channels, design §7) is pruned
    assert "vit.embeddings.patch_embeddings.projection" in res.plan.kept
    out = res.module(pixel_values=data[0]["pixel_values"][:3])["logits"]
    assert out.shape == (3, 5)  # a batch size the example did not have


def test_qwen2_gqa_with_cache_default_compiles_with_taylor():
    """num_key_value_heads=2 < num_attention_heads=4; ``use_cache`` left on; dict batches
    without labels (next-token loss); verified; any batch size and length afterwards."""
    model = _qwen2()
    data = [_text(s, batch=2, vocab=64, labels=0) for s in (0, 1)]
    res = fxprune.compile(model, "taylor", data=data, flops=0.6, repair=None, progress=False)
    assert res.report.frontend == "export" and res.report.max_rel_error < 1e-6
    assert res.report.flops_after < 0.62 * res.report.flops_before
    slim = res.module
    for batch, seq in ((1, 5), (3, 11)):
        ids = torch.randint(0, 64, (batch, seq))
        out = slim(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert out["logits"].shape == (batch, seq, 64) and "past_key_values" not in out


@pytest.mark.slow
def test_qwen2_saliency_takes_dict_batches():
    model = _qwen2()
    data = [_text(s, batch=2, vocab=64, labels=0) for s in (0, 1)]
    sal = fxprune.saliency(model, "taylor", data=data, progress=False)
    heads = sal.groups["model.layers.0.self_attn.q_proj"]  # a KV head with its 2 queries
    assert heads.shape == (2,) and bool((heads != 0).all())
