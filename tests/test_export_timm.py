"""timm models that symbolic tracing refuses only for shape-checking control flow
(``Conv2dSame`` padding, ``ConvMlp`` pre-logits, windowed / cross attention) prune and
verify through the torch.export front end, chosen automatically; zoo models give the
same groups on both front ends. Random weights (pretrained=False), small inputs."""
import pytest
import timm
import torch

import fxprune
from fxprune.errors import TraceError

REFUSED_BY_FX = [  # (name, create_model kwargs, input size)
    ("vgg11_bn", {}, 32),
    ("maxvit_tiny_tf_224", {"img_size": 64}, 64),
    ("crossvit_tiny_240", {}, 240),
]


def _model(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return model, torch.randn(1, 3, size, size)


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, size", REFUSED_BY_FX)
def test_shape_checked_timm_models_prune_and_verify_through_export(name, kwargs, size, caplog):
    model, x = _model(name, kwargs, size)
    try:  # FX refuses the model, or keeps the shape-checking modules whole as leaves
        with caplog.at_level("WARNING", logger="fxprune"):
            fxprune.groups(model, x, frontend="fx", cache=False)
    except TraceError as exc:
        assert "control flow" in str(exc)
    else:
        assert any("could not trace" in r.getMessage() and "control flow" in r.getMessage()
                   for r in caplog.records)
    groups = fxprune.groups(model, x)  # auto: torch.export
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) >= len(groups) // 2, [(g.id, g.reason) for g in groups if not g.prunable]
    names = {n for n, _ in model.named_parameters()}
    assert {m.target for g in groups for m in g.members} & names  # qualified parameter names
    result = fxprune.compile(model, "l2", x, flops=0.6, repair=None, progress=False)
    assert result.report.frontend == "export"
    assert result.report.max_rel_error < 1e-4
    assert result.report.flops_after < 0.65 * result.report.flops_before
    x2 = torch.randn(2, *x.shape[1:])
    assert result.module(x2).shape == (2, 1000)


ZOO = [("resnet18", {}, 32), ("vit_tiny_patch16_224", {"img_size": 32}, 32),
       ("mobilenetv3_small_100", {}, 32), ("convnext_atto", {}, 32),
       ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, 64)]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, size", ZOO)
def test_zoo_models_have_the_same_groups_on_both_front_ends(name, kwargs, size):
    model, x = _model(name, kwargs, size)
    summary = lambda gs: [(g.id, g.size, g.prunable, g.kind, sorted(
        (m.target, m.dim, m.role, str(m.index_map)) for m in g.members)) for g in gs]
    assert summary(fxprune.groups(model, x, frontend="export")) == \
        summary(fxprune.groups(model, x, frontend="fx"))
