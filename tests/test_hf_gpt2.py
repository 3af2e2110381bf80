"""GPT-2 through the torch.export front end: Hugging Face's ``Conv1D`` layers
(``addmm(bias, x, W)`` with ``W`` stored ``[in, out]``), the fused ``c_attn`` split into
q, k, v heads, and ``GPT2LMHeadModel``'s causal-LM loss (its ``loss_type`` is None)."""
import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")

from fxprune.passes.model_loss import default_model_loss, is_causal_lm  # noqa: E402

LAYERS, HEADS, EMBD, VOCAB = 2, 4, 32, 64


def _gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=EMBD, n_layer=LAYERS,
                                     n_head=HEADS, n_positions=64, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def _ids(batch=2, seq=8):
    return torch.randint(1, VOCAB, (batch, seq))


def test_groups_are_heads_and_mlp_units_of_each_block():
    groups = {g.id: g for g in fxprune.groups(_gpt2(), (_ids(),))}
    for layer in range(LAYERS):
        p = f"transformer.h.{layer}."
        heads = groups[p + "attn.c_attn"]
        assert (heads.kind, heads.size, heads.prunable) == ("head", HEADS, True)
        roles = {(m.target, m.role) for m in heads.members}
        assert roles == {(p + "attn.c_attn.weight", "producer"),
                         (p + "attn.c_attn.bias", "bias"),
                         (p + "attn.c_proj.weight", "consumer")}
        weight = next(m for m in heads.members if m.target == p + "attn.c_attn.weight")
        assert all(len(ix) == 3 * EMBD // HEADS for ix in weight.index_map)  # q, k and v rows
        mlp = groups[p + "mlp.c_fc"]
        assert (mlp.kind, mlp.size, mlp.prunable) == ("channel", 4 * EMBD, True)
    stream = groups["transformer.wpe"]  # the residual stream, through the tied lm_head
    assert (stream.kind, stream.size, stream.prunable) == ("stream", EMBD, True)


def test_the_residual_stream_prunes_and_the_tied_embedding_stays_tied():
    """``transformer.wte.weight`` and ``lm_head.weight`` are one tensor; the graph reads
    it under one name for both uses, and the slim model keeps the two names tied."""
    model, ids = _gpt2(), _ids()
    res = fxprune.compile(model, "l2", (ids,), flops=0.5, progress=False,
                          ignore=["transformer.h.*.mlp.c_fc", "transformer.h.*.attn.c_attn"])
    kept = {row.id: row.kept for row in res.report.groups}
    assert kept["transformer.wpe"] < EMBD and res.report.max_rel_error < 1e-5
    params = dict(res.module.named_parameters(remove_duplicate=False))
    assert params["transformer.wte.weight"] is params["lm_head.weight"]
    assert params["lm_head.weight"].shape == (VOCAB, kept["transformer.wpe"])
    assert model.lm_head.weight is model.transformer.wte.weight  # the user's model: as is
    assert model.lm_head.weight.shape == (VOCAB, EMBD)


def test_compile_l2_is_exact_meets_the_budget_and_leaves_the_model_alone():
    model, ids = _gpt2(), _ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxprune.compile(model, "l2", (ids,), flops=0.7, progress=False)
    report = res.report
    assert report.frontend == "export" and report.max_rel_error < 1e-5
    # the cost model counts addmm's inner dim: what selection predicted is what was cut
    assert report.predicted_flops / report.flops_before == pytest.approx(report.flops_ratio)
    assert 0.6 < report.flops_ratio <= 0.7
    slim = res.module
    assert isinstance(slim.get_submodule("transformer.h.0.mlp.c_fc"), torch.nn.Linear)
    for batch, seq in ((1, 5), (3, 11)):
        assert slim(_ids(batch, seq))["logits"].shape == (batch, seq, VOCAB)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_default_loss_is_the_models_own_causal_lm_loss():
    model, ids = _gpt2(torch.float64), _ids(3, 7)
    assert model.loss_type is None and is_causal_lm(model)
    out = model(input_ids=ids)
    got = default_model_loss(model)(out, ids)
    torch.testing.assert_close(got, model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("criterion", ["auto", "oba"])
def test_compile_with_data_scores_repairs_and_verifies(criterion):
    model = _gpt2()
    data = [{"input_ids": _ids(8, 8)} for _ in range(4)]  # 192 training rows per layer
    res = fxprune.compile(model, criterion, data=data, flops=0.7, progress=False)
    assert res.plan.meta["criterion"] == ("obs" if criterion == "auto" else criterion)
    assert res.report.max_rel_error < 1e-5
    if criterion == "auto":  # obs measures every Conv1D consumer and repair re-fits them
        fitted = {row.name for row in res.report.repair.layers if row.action == "re-fit"}
        assert {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"} <= fitted
    logits = res.module(_ids(2, 6))["logits"]
    assert torch.isfinite(logits).all()


def test_save_pretrained_round_trips_a_uniform_mlp_prune(tmp_path):
    """Uniformly pruned MLPs become ``n_inner``; the ``Conv1D`` weights get their
    ``[in, out]`` layout back; a pruned stream is refused (heads are n_embd / n_head)."""
    model, ids = _gpt2(), _ids()
    res = fxprune.compile(model, "l2", (ids,), flops=0.75, uniform=True, progress=False,
                          ignore=["transformer.h.*.attn.c_attn", "transformer.wpe"])
    fxprune.save_pretrained(res, model, str(tmp_path / "slim"))
    again = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "slim")).eval()
    assert again.config.n_inner < 4 * EMBD
    torch.testing.assert_close(again(ids).logits, res.module(ids)["logits"])
    stream = fxprune.compile(model, "l2", (ids,), flops=0.75, uniform=True, progress=False,
                             ignore=["transformer.h.*.attn.c_attn", "transformer.h.*.mlp.c_fc"])
    with pytest.raises(fxprune.FxpruneError, match="residual stream"):
        fxprune.save_pretrained(stream, model, str(tmp_path / "stream"))
