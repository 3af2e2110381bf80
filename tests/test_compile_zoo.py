"""End-to-end pruning of the supported timm / torchvision models (issue: rewrite).

Default run: a representative subset at reduced resolution (residual CNN, ViT,
Swin, Mixer, LeViT, EfficientNet). The full list at 224x224 is `slow`-marked.
"""
import pytest
import timm
import torch
import torchvision

import fxprune
from fxprune.passes.count import count_flops

FAST = [("timm:resnet50", {}, 64), ("timm:vit_small_patch16_224", {"img_size": 64}, 64),
        ("timm:swin_tiny_patch4_window7_224", {"img_size": 112}, 112),
        ("timm:mixer_b16_224", {"img_size": 64}, 64), ("timm:levit_128", {"img_size": 64}, 64),
        ("timm:efficientnet_b0", {}, 64)]
FULL = ["timm:" + n for n in (
    "resnet50", "resnext50_32x4d", "vit_base_patch16_224", "deit_small_patch16_224",
    "swin_tiny_patch4_window7_224", "beit_base_patch16_224", "convnext_tiny", "efficientnet_b0",
    "mobilenetv3_large_100", "regnety_016", "densenet121", "mixer_b16_224", "levit_128")] + [
    "torchvision:" + n for n in ("resnet50", "vit_b_16", "mobilenet_v2")]


def build(spec, kwargs):
    lib, name = spec.split(":")
    torch.manual_seed(0)
    if lib == "timm":
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def check_prune(model, x, criterion="l2", **extra):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxprune.compile(model, criterion, example_inputs=x, flops=0.5, **extra)
    report = res.report
    assert report.max_rel_error <= (1e-6 if x.dtype == torch.float64 else 1e-4)
    assert abs(report.flops_ratio - 0.5) <= 0.02 or report.notes
    # the report counts one example, or the batch when the slim model is tied to it
    whole = any("whole batch" in note for note in report.notes)
    independent = count_flops(res.module, (x,) if whole else (x[:1],))
    assert abs(independent - report.flops_after) <= 0.01 * report.flops_after
    torch.export.export(res.module, (x,))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"input model changed: {k}"
    return res


@pytest.mark.parametrize("spec,kwargs,size", FAST, ids=[s for s, _, _ in FAST])
def test_zoo_subset_l2_half_flops(spec, kwargs, size):
    model = build(spec, kwargs).double()
    check_prune(model, torch.randn(1, 3, size, size, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("spec", FULL)
def test_zoo_full_l2_half_flops(spec):
    check_prune(build(spec, {}).double(), torch.randn(1, 3, 224, 224, dtype=torch.float64))


def test_vit_heads_pruned_without_manual_patching():
    """Half of every head group goes: qkv keeps 3 of 6 heads (3*3*64 rows), proj keeps
    3*64 input columns, and the traced head count in the reshape is patched."""
    model = build("timm:vit_small_patch16_224", {"img_size": 64, "depth": 2}).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.5)
    assert res.report.max_rel_error <= 1e-6
    slim = res.module
    for block in range(2):
        assert slim.get_submodule(f"blocks.{block}.attn.qkv").out_features == 3 * 3 * 64
        assert slim.get_submodule(f"blocks.{block}.attn.proj").in_features == 3 * 64
    head_counts = [n.args[4] for n in slim.graph.nodes if n.target == "reshape" and len(n.args) == 6]
    assert head_counts == [3, 3]
    torch.export.export(slim, (x,))


def test_beit_heads_and_stream_pruned():
    """BEiT merges its heads with ``reshape(B, N, C)``, C read from the residual stream's
    shape at run time: the rewrite infers that size, so heads and stream both prune."""
    model = build("timm:beit_base_patch16_224", {"img_size": 64, "depth": 2}).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    groups = {g.id: g for g in fxprune.groups(model, x)}
    assert groups["patch_embed.proj"].prunable and groups["blocks.0.attn.qkv"].prunable
    res = fxprune.compile(model, "l2", example_inputs=x, sparsity=0.25)
    assert res.report.max_rel_error <= 1e-6
    kept = {row.id: row.kept for row in res.report.groups}
    assert kept["patch_embed.proj"] == 576 and kept["blocks.1.attn.qkv"] == 9
    torch.export.export(res.module, (x,))


OBA_FAST = [("timm:vit_small_patch16_224", {"img_size": 32, "depth": 2}, 32),
            ("timm:swin_tiny_patch4_window7_224", {"img_size": 56, "depths": (2, 2, 2, 2)}, 56),
            ("timm:convnext_tiny", {"depths": (1, 1, 1, 1)}, 32),
            ("timm:efficientnet_b0", {}, 32), ("timm:mobilenetv3_large_100", {}, 32)]


def _oba_prune(model, size):
    torch.manual_seed(1)
    _unzero_linears(model)
    x = torch.randn(2, 3, size, size)
    data = [(x, torch.randint(0, 1000, (2,)))]
    return check_prune(model, x, "oba", data=data, progress=False)


def _unzero_linears(model):
    """timm's Mixer and torchvision's ViT zero-initialise their classifier head: with
    random weights the loss then does not depend on any pruned layer, every OBA score is
    0 and compile refuses the plan (DegenerateScoresError, as it should). Trained heads
    are not zero: give such all-zero Linear weights small random values."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
                mod.weight.normal_(0, 0.02)


@pytest.mark.parametrize("spec,kwargs,size", OBA_FAST, ids=[s for s, _, _ in OBA_FAST])
def test_zoo_oba_half_flops(spec, kwargs, size):
    """OBA end to end (attention products, LayerScale, SE gating, hard-swish), on
    shallower/smaller variants of the zoo models so the default run stays fast."""
    res = _oba_prune(build(spec, kwargs), size)
    assert res.saliency.criterion == "oba"


@pytest.mark.slow
@pytest.mark.parametrize("spec", FULL)
def test_zoo_full_oba_half_flops(spec):
    _oba_prune(build(spec, {}), 224)


#: reduced input sizes for the export pass over the zoo (the models that take img_size
#: are built for it); the rest run at 224
SMALL = {"timm:vit_base_patch16_224": 64, "timm:deit_small_patch16_224": 64,
         "timm:beit_base_patch16_224": 64, "timm:mixer_b16_224": 64, "timm:levit_128": 64,
         "timm:swin_tiny_patch4_window7_224": 112}


def _groups_summary(groups):
    return [(g.id, g.size, g.prunable, g.kind, sorted(
        (m.target, m.dim, m.role, str(m.index_map)) for m in g.members)) for g in groups]


@pytest.mark.slow
@pytest.mark.parametrize("spec", FULL)
def test_zoo_full_through_the_export_front_end(spec):
    """The 16-model zoo captured with torch.export (ATen graph) instead of symbolic
    tracing: the same groups as the FX front end, and the same checks (verified, FLOPs
    counted independently, exportable, input model untouched)."""
    size = SMALL.get(spec, 224)
    model = build(spec, {"img_size": size} if spec in SMALL else {}).double()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    exported = sorted(_groups_summary(fxprune.groups(model, x, frontend="export")))
    fx = fxprune.groups(model, x, frontend="fx")
    if any("unknown op" in (g.reason or "") for g in fx):
        # FX keeps an op whole that export decomposes (torchvision's nn.MultiheadAttention):
        # the same groups, and every channel FX prunes export prunes too
        by_id = {g[0]: g for g in exported}
        assert sorted(by_id) == sorted(g.id for g in fx)
        assert all(by_id[g.id][2] for g in fx if g.prunable)
    else:  # the same groups (in any order)
        assert exported == sorted(_groups_summary(fx))
    res = check_prune(model, x, frontend="export")
    assert res.report.frontend == "export"
