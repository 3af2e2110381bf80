"""Per Hugging Face family (issue 13): ``compile`` with ``"l2"`` and ``"oba"`` verified
exact on the export front end, and the slim model as a ``.pt2`` that runs at batch 1 and
4 and, for text models, at two sequence lengths (BERT's included: its sequence dim is
free up to ``max_position_embeddings``), with the slim GraphModule's outputs. Tiny
configs, random weights, no hub."""
import pytest
import torch

import fxprune
from fxprune.passes.export_capture import export_dynamic

transformers = pytest.importorskip("transformers")

from hf_models import BERT, DECODER, VIT, tiny  # noqa: E402  (after the importorskip)


def _text(batch, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pixels(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g, dtype=torch.float64)}


def _hidden_loss(out, _targets):
    """BertModel has no head: score the energy of its last hidden state."""
    return out["last_hidden_state"].pow(2).mean()


#: family -> (class, default config, overrides, inputs(batch, seq, seed), output key,
#: compile options for data criteria)
FAMILIES = {
    "bert": ("BertModel", BERT, {}, lambda b, s, r=0: _text(b, s, 50, r),
             "last_hidden_state", dict(loss_fn=_hidden_loss)),
    "bert-cls": ("BertForSequenceClassification", BERT, dict(num_labels=3),
                 lambda b, s, r=0: _text(b, s, 50, r), "logits", {}),
    "vit": ("ViTForImageClassification", VIT, dict(num_labels=5),
            lambda b, s, r=0: _pixels(b, r), "logits", {}),
    "llama-gqa": ("LlamaForCausalLM", DECODER, {}, lambda b, s, r=0: _text(b, s, 64, r),
                  "logits", {}),
    "qwen2-gqa": ("Qwen2ForCausalLM", DECODER, {}, lambda b, s, r=0: _text(b, s, 64, r),
                  "logits", {}),
}
TEXT = {"bert", "bert-cls", "llama-gqa", "qwen2-gqa"}


def _model(family):
    cls, defaults, overrides, *_ = FAMILIES[family]
    return tiny(cls, defaults, **overrides)


def _compile(family, criterion):
    _, _, _, inputs, _, options = FAMILIES[family]
    data = [(inputs(2, 8, seed), None) for seed in (0, 1)]
    kw = dict(data=data, **options) if criterion != "l2" else {}
    return fxprune.compile(_model(family), criterion, inputs(2, 8), flops=0.6, repair=None,
                           progress=False, **kw)


@pytest.fixture(scope="module")
def slim_l2():
    """The l2 compile of each family, made once for the tests of this file."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _compile(family, "l2")
        return cache[family]
    return get


def test_gqa_families_have_fewer_kv_heads():
    for family in ("llama-gqa", "qwen2-gqa"):
        cfg = _model(family).config
        assert cfg.num_key_value_heads < cfg.num_attention_heads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_l2_compile_is_verified_exact(family, slim_l2):
    res = slim_l2(family)
    _check_exact(res)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_oba_compile_is_verified_exact(family):
    res = _compile(family, "oba")
    _check_exact(res)
    assert res.saliency.criterion == "oba"


def _check_exact(res):
    assert res.report.frontend == "export"
    # float64 models; Llama / Qwen2's RMSNorm computes in float32 (the model's own
    # rounding), hence not 1e-12
    assert res.report.max_rel_error < 1e-6
    assert res.report.flops_after < 0.62 * res.report.flops_before
    assert any(len(k) < res.plan.sizes[g] for g, k in res.plan.kept.items())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_slim_pt2_round_trip_at_two_batches_and_lengths(family, slim_l2, tmp_path):
    _, _, _, inputs, key, _ = FAMILIES[family]
    slim = slim_l2(family).module
    capture = export_dynamic(slim, (), inputs(2, 8))
    assert capture.free == ("batch", "seq")
    if family in ("bert", "bert-cls"):  # the position table bounds the length
        assert capture.max_size["seq"] == BERT["max_position_embeddings"]
    path = str(tmp_path / "slim.pt2")
    torch.export.save(capture.program, path)
    loaded = torch.export.load(path).module()
    lengths = (5, 11) if family in TEXT else (None,)
    for batch in (1, 4):
        for seq in lengths:
            x = inputs(batch, seq, 7)
            with torch.no_grad():
                got, want = loaded(**x)[key], slim(**x)[key]
            assert got.shape[0] == batch
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_bert_slim_takes_other_lengths_and_refuses_past_its_positions(slim_l2):
    """The sequence dim is free in the slim GraphModule too, up to the position table."""
    slim = slim_l2("bert").module
    dense = _model("bert")
    for seq in (1, 16):
        x = _text(3, seq, 50, 2)
        assert slim(**x)["last_hidden_state"].shape == (3, seq, 32)
    capture = export_dynamic(slim, (), _text(2, 8, 50))
    with pytest.raises(Exception, match="16"):
        capture.program.module()(**_text(2, 17, 50))
    with pytest.raises(Exception):
        dense(**_text(2, 17, 50))  # the dense model cannot either


@pytest.mark.parametrize("family", ["bert", "vit", "qwen2-gqa"])
def test_slim_torch_save_round_trip(family, slim_l2, tmp_path):
    """The export front end's slim GraphModule pickles (design §7: ``torch.save`` /
    ``torch.load`` need no fxprune): no run-time guard function, the plain FX tracer."""
    _, _, _, inputs, key, _ = FAMILIES[family]
    slim = slim_l2(family).module
    path = tmp_path / "slim.pt"
    torch.save(slim, path)
    loaded = torch.load(path, weights_only=False)
    x = inputs(3, 6, 5)
    torch.testing.assert_close(loaded(**x)[key], slim(**x)[key], rtol=0, atol=0)
