"""passes.eval_mode: eval inside the block, every submodule's own flag back after it."""
import pytest
import torch
from torch import nn

from fxprune.passes.eval_mode import eval_mode
from fxprune.passes.verify import check


def _mixed_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Dropout(0.5)))
    model.train()
    model[1].eval()  # a frozen BN inside a training model
    return model


def _flags(model):
    return [m.training for m in model.modules()]


def test_every_submodule_is_in_eval_mode_inside_and_restored_after():
    first, second = _mixed_model(), _mixed_model()
    before = _flags(first)
    with eval_mode(first, second):
        assert not any(_flags(first)) and not any(_flags(second))
    assert _flags(first) == before == _flags(second)
    assert before == [True, True, False, True, True]


def test_flags_are_restored_when_the_block_raises():
    model = _mixed_model()
    before = _flags(model)
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert _flags(model) == before


def test_verification_leaves_both_models_flags_as_they_were():
    slim, reference = _mixed_model(), _mixed_model()
    reference.load_state_dict(slim.state_dict())
    error = check(slim, reference, (torch.randn(5, 3),))
    assert error == 0.0
    assert _flags(slim) == _flags(reference) == [True, True, False, True, True]
