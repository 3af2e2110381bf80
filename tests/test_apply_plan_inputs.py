"""``fxprune.apply_plan(model, plan)`` without ``example_inputs``: compile records the
example inputs (keyword names, constants, shapes, dtypes, integer ranges) in
``plan.meta["inputs"]`` and the replay rebuilds inputs of that kind from it
(passes/input_spec.py), so token models replay from a plan file alone."""
import pytest
import torch

import fxprune
from fxprune.passes.input_spec import input_spec, inputs_from_spec
from fxprune.passes.keyword_inputs import KeywordInputs


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_spec_records_and_rebuilds_keyword_token_inputs():
    ids = torch.tensor([[3, 9, 4], [7, 5, 3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pixels = torch.randn(2, 3, dtype=torch.float32)
    inputs = KeywordInputs([ids, mask, pixels], ["input_ids", "attention_mask", "extra"],
                           {"output_hidden_states": True})
    spec = fxprune.Plan({}, meta={"inputs": input_spec(inputs)}).to_json()  # JSON-safe
    spec = fxprune.Plan.from_json(spec).meta["inputs"]
    model = torch.nn.Linear(3, 2).double()
    again = inputs_from_spec(model, spec)
    assert isinstance(again, KeywordInputs)
    assert again.names == ("input_ids", "attention_mask", "extra")
    assert again.constants == {"output_hidden_states": True}
    got_ids, got_mask, got_pixels = again
    assert got_ids.shape == (2, 3) and got_ids.dtype == torch.int64
    assert int(got_ids.min()) >= 3 and int(got_ids.max()) <= 9  # ids the model took
    assert torch.equal(got_mask, torch.ones(2, 3, dtype=torch.int64))  # nothing masked
    assert got_pixels.dtype == torch.float64 and not got_pixels.any()  # the model's dtype
    assert torch.equal(inputs_from_spec(model, spec)[0], got_ids)  # seeded


def test_positional_inputs_rebuild_as_a_tuple():
    spec = input_spec((torch.randint(2, 5, (4, 6)),))
    again = inputs_from_spec(torch.nn.Linear(2, 2), spec)
    assert type(again) is tuple and again[0].shape == (4, 6)
    assert int(again[0].min()) >= 2 and int(again[0].max()) <= 4


def test_a_constant_json_cannot_hold_asks_for_example_inputs():
    inputs = KeywordInputs([torch.zeros(2, 3)], ["x"], {"cfg": object()})
    spec = input_spec(inputs)
    assert spec["unrecorded"] == ["cfg"]
    with pytest.raises(fxprune.FxpruneError, match="pass example_inputs"):
        inputs_from_spec(torch.nn.Linear(3, 2), spec)


def test_float_model_replays_from_the_plan_alone_and_from_an_old_plan():
    torch.manual_seed(0)
    model, x = ConvNet().double().eval(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    res = fxprune.compile(model, "l2", x, flops=0.6, progress=False)
    plan = fxprune.Plan.from_json(res.plan.to_json())
    again = fxprune.apply_plan(model, plan)
    torch.testing.assert_close(again.module(x), res.module(x))
    del plan.meta["inputs"]  # a plan from before the record: its input shapes only
    torch.testing.assert_close(fxprune.apply_plan(model, plan).module(x), res.module(x))


def _tiny(cls, family, **config):
    """A tiny Hugging Face model (these tests only skip without transformers)."""
    pytest.importorskip("transformers")
    import hf_models
    return hf_models.tiny(cls, getattr(hf_models, family), **config)


def test_bert_classifier_replays_from_a_plan_file_without_inputs(tmp_path):
    model = _tiny("BertForSequenceClassification", "BERT", num_labels=3)
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    x = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    res = fxprune.compile(model, "l2", x, flops=0.6, progress=False)
    res.plan.to_json(str(tmp_path / "plan.json"))
    fresh = _tiny("BertForSequenceClassification", "BERT", num_labels=3)
    again = fxprune.apply_plan(fresh, fxprune.Plan.from_json(str(tmp_path / "plan.json")))
    assert again.report.frontend == "export" and again.report.max_rel_error < 1e-6
    other = {"input_ids": torch.randint(0, 50, (3, 5)), "attention_mask":
             torch.ones(3, 5, dtype=torch.long), "token_type_ids":
             torch.zeros(3, 5, dtype=torch.long)}
    torch.testing.assert_close(again.module(**other)["logits"], res.module(**other)["logits"])


def test_llama_positional_ids_replay_and_load_slim_without_inputs(tmp_path):
    model = _tiny("LlamaForCausalLM", "DECODER", use_cache=False)
    ids = torch.randint(0, 64, (2, 8))
    res = fxprune.compile(model, "l2", (ids,), flops=0.6, progress=False)
    weights, _ = fxprune.save_slim(res, str(tmp_path / "slim.safetensors"))
    slim = fxprune.load_slim(_tiny("LlamaForCausalLM", "DECODER", use_cache=False), None, weights)
    x = torch.randint(0, 64, (1, 11))
    torch.testing.assert_close(slim(x)["logits"], res.module(x)["logits"])
