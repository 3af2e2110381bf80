"""The dynamic-batch ``torch.export`` capture (passes/export_capture.py): ``.pt2``
programs of slim models run at any batch size (and sequence length for token inputs)."""
import logging

import pytest
import torch

import fxprune
from fxprune.errors import TraceError
from fxprune.passes.export_capture import export_dynamic


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class TokenNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, ids, mask):
        h = self.emb(ids) * mask.unsqueeze(-1)
        return self.fc2(torch.relu(self.fc1(h))).sum(1)


class FixedBatch(torch.nn.Module):
    def forward(self, x):
        return x.view(3) * 2  # only a batch of 1 fits


class FixedLength(TokenNet):
    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(6, 16))

    def forward(self, ids, mask):
        return super().forward(ids, mask) + (self.emb(ids) + self.pos).sum(1)


def _save_load(program, tmp_path):
    path = tmp_path / "m.pt2"
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def test_slim_pt2_round_trip_at_batch_1_and_4(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(1, 3, 8, 8)
    slim = fxprune.compile(model, "l2", x, flops=0.6).module.eval()
    cap = export_dynamic(slim, (x,))
    assert cap.free == ("batch", "seq")
    loaded = _save_load(cap.program, tmp_path)
    for batch in (1, 4):
        xb = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(loaded(xb), slim(xb))


def test_token_inputs_get_free_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    model = TokenNet().eval()
    ids, mask = torch.randint(0, 50, (1, 1)), torch.ones(1, 1)
    loaded = _save_load(export_dynamic(model, (ids, mask.long())).program, tmp_path)
    for batch, seq in ((1, 5), (4, 9)):
        ids = torch.randint(0, 50, (batch, seq))
        mask = torch.randint(0, 2, (batch, seq))
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask))


def test_keyword_inputs_are_free_too():
    model = TokenNet().eval()
    ids = torch.randint(0, 50, (2, 3))
    cap = export_dynamic(model, (ids,), {"mask": torch.ones(2, 3, dtype=torch.long)})
    ids4 = torch.randint(0, 50, (4, 7))
    mask4 = torch.ones(4, 7, dtype=torch.long)
    torch.testing.assert_close(cap.program.module()(ids4, mask=mask4), model(ids4, mask4))


def test_a_model_that_fixes_the_batch_is_exported_static_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cap = export_dynamic(FixedBatch(), (torch.randn(1, 3),))
    assert cap.free == ()
    assert "fixes the batch" in caplog.text
    torch.testing.assert_close(cap.program.module()(torch.ones(1, 3)), torch.full((3,), 2.))
    assert "shape '[3]' is invalid" in caplog.text


def test_a_fixed_sequence_length_keeps_the_batch_free(caplog):
    model = FixedLength().eval()
    ids = torch.randint(0, 50, (1, 6))
    with caplog.at_level(logging.WARNING):
        cap = export_dynamic(model, (ids, torch.ones_like(ids)))
    assert cap.free == ("batch",) and "fixes the seq" in caplog.text
    ids = torch.randint(0, 50, (3, 6))
    torch.testing.assert_close(cap.program.module()(ids, torch.ones_like(ids)),
                               model(ids, torch.ones_like(ids)))


def test_unexportable_model_fails_closed():
    class Python(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x
    with pytest.raises(TraceError, match="torch.export could not capture Python"):
        export_dynamic(Python(), (torch.randn(2, 3),))
