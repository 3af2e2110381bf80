"""``fxprune prune hf:FOLDER``: a local Hugging Face model folder in, a folder that
``AutoModelForCausalLM.from_pretrained`` loads out (issue 13, item 5). Tiny config,
random weights, no hub."""
from __future__ import annotations

import pytest
import torch

from test_cli import assert_one_line_error, call_main, run_cli

transformers = pytest.importorskip("transformers")

from hf_models import BERT, DECODER, tiny  # noqa: E402  (after the importorskip)


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense") / "llama"
    tiny("LlamaForCausalLM", DECODER, dtype=None, max_position_embeddings=64
         ).save_pretrained(str(folder))
    return folder


def test_prune_writes_a_folder_from_pretrained_loads(dense_folder, tmp_path):
    out = tmp_path / "slim"
    proc = run_cli("prune", f"hf:{dense_folder}", "--flops", "0.6", "--uniform",
                   "--round-to", "4", "--input-size", "16", "--out", out,
                   "--no-measure-latency")
    assert proc.returncode == 0, proc.stderr
    assert "Hugging Face folder" in proc.stderr and "front end: torch.export" in proc.stdout
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(dense_folder))
    assert back.config.intermediate_size < dense.config.intermediate_size
    assert back.config.hidden_size % back.config.num_attention_heads == 0
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in dense.parameters())
    ids = torch.randint(0, 64, (1, 5))
    assert back.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense") / "bert"
    tiny("BertForSequenceClassification", BERT, dtype=None, num_labels=3
         ).save_pretrained(str(folder))
    return folder


@pytest.mark.slow  # ~30 s: a subprocess prunes and exports twice
def test_prune_export_pt2_runs_at_other_batches_and_lengths(bert_folder, tmp_path):
    """``--export`` of a BERT folder: the .pt2 takes batch 1 and 4 and sequence lengths
    other than --input-size (up to the position table), with the ``--out x.pt`` slim
    GraphModule's outputs."""
    proc = run_cli("prune", f"hf:{bert_folder}", "--flops", "0.6", "--input-size", "8",
                   "--export", tmp_path / "slim.pt2", "--out", tmp_path / "slim.pt",
                   "--no-measure-latency")
    assert proc.returncode == 0, proc.stderr
    program = torch.export.load(str(tmp_path / "slim.pt2")).module()
    slim = torch.load(tmp_path / "slim.pt", weights_only=False)
    for batch, seq in ((1, 5), (4, 11), (4, 16)):
        ids = torch.randint(0, BERT["vocab_size"], (batch, seq))
        torch.testing.assert_close(program(ids)["logits"], slim(ids)["logits"])
    with pytest.raises(Exception, match="16"):  # past max_position_embeddings
        program(torch.randint(0, 50, (1, 17)))


def test_a_missing_folder_is_one_line(tmp_path, capsys):
    res = call_main(capsys, "prune", f"hf:{tmp_path / 'nothing'}", "--flops", "0.5")
    assert res.returncode != 0 and "no config.json" in res.stderr


def test_image_data_for_a_text_model_is_refused(dense_folder, tmp_path):
    from PIL import Image
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cls" / "a.png")
    proc = run_cli("prune", f"hf:{dense_folder}", "--flops", "0.5", "--data", tmp_path,
                   "--no-measure-latency")
    assert_one_line_error(proc, "text model")


def test_a_non_empty_out_folder_is_refused_before_any_work(dense_folder, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("keep me")
    res = call_main(capsys, "prune", f"hf:{dense_folder}", "--flops", "0.5", "--out",
                    tmp_path / "taken")
    assert res.returncode != 0 and "not empty" in res.stderr
    assert (tmp_path / "taken" / "x.txt").read_text() == "keep me"
