"""Channel analysis (design §3): golden groups of every fixture.

The golden expectations are derived from each fixture's architecture (models/fixtures*.py),
one group at a time: its id, size, kind, prunability and every member with its role and
``index_map``, and a structural consistency check. The numerical invariant (zeroing a
group's member slices removes exactly those channels) is in test_group_invariants.py.
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest

from fxprune.models import list_models
from goldens import (analysed, bias, bn, check_groups, classifier, cons, conv_bn, ident,
                     merge, prod)

FIXTURES = [name for name in list_models() if name.startswith("tiny_")]

# --------------------------------------------------------------------------- goldens
def test_tiny_mlp_chain():
    """A Linear chain: each hidden layer's rows, bias and the next layer's columns."""
    _, _, groups = analysed("tiny_mlp")
    check_groups(groups, [
        ("fc1", 32, "channel", True, merge(prod("fc1.weight", ident(32)), bias("fc1.bias", ident(32)),
                                           cons("fc2.weight", ident(32)))),
        ("fc2", 32, "channel", True, merge(prod("fc2.weight", ident(32)), bias("fc2.bias", ident(32)),
                                           cons("fc3.weight", ident(32)))),
        classifier("fc3", "fc3"),
    ])
    assert "reaches the model output" in groups["fc3"].reason


def test_tiny_vgg_conv_bn_chain_through_pooling():
    """Conv rows + BN entries + next conv's columns; max pooling passes channels through;
    global pool -> flatten -> Linear consumes one column per channel."""
    _, _, groups = analysed("tiny_vgg")
    f = "features"
    check_groups(groups, [
        (f"{f}.0.0", 8, "channel", True, merge(conv_bn(f"{f}.0", 8), cons(f"{f}.1.0.weight", ident(8)))),
        (f"{f}.1.0", 8, "channel", True, merge(conv_bn(f"{f}.1", 8), cons(f"{f}.3.0.weight", ident(8)))),
        (f"{f}.3.0", 16, "channel", True, merge(conv_bn(f"{f}.3", 16), cons(f"{f}.5.0.weight", ident(16)))),
        (f"{f}.5.0", 16, "channel", True, merge(conv_bn(f"{f}.5", 16), cons("head.fc.weight", ident(16)))),
        classifier("head.fc", "head.fc"),
    ])


def test_tiny_resnet_residual_add_couples_the_stream():
    """The identity block's add couples the stem with conv2's output; the projection
    block's add couples its conv2 with the 1x1 shortcut conv."""
    _, _, groups = analysed("tiny_resnet")
    i8, i16 = ident(8), ident(16)
    check_groups(groups, [
        ("stem.0", 8, "stream", True, merge(
            conv_bn("stem", 8), cons("layer1.conv1.weight", i8),
            prod("layer1.conv2.weight", i8), bn("layer1.bn2", i8),
            cons("layer2.conv1.weight", i8), cons("layer2.shortcut.0.weight", i8))),
        ("layer1.conv1", 8, "channel", True, merge(
            prod("layer1.conv1.weight", i8), bn("layer1.bn1", i8), cons("layer1.conv2.weight", i8))),
        ("layer2.conv1", 16, "channel", True, merge(
            prod("layer2.conv1.weight", i16), bn("layer2.bn1", i16), cons("layer2.conv2.weight", i16))),
        ("layer2.conv2", 16, "stream", True, merge(
            prod("layer2.conv2.weight", i16), bn("layer2.bn2", i16),
            conv_bn("layer2.shortcut", 16), cons("head.fc.weight", i16))),
        classifier("head.fc", "head.fc"),
    ])


def test_tiny_bottleneck_projection_and_identity_blocks():
    _, _, groups = analysed("tiny_bottleneck")
    b0, b1 = "layer1.0", "layer1.1"
    i4, i8, i16 = ident(4), ident(8), ident(16)
    check_groups(groups, [
        ("stem.0", 8, "channel", True, merge(
            conv_bn("stem", 8), cons(f"{b0}.conv1.0.weight", i8), cons(f"{b0}.shortcut.0.weight", i8))),
        (f"{b0}.conv1.0", 4, "channel", True, merge(conv_bn(f"{b0}.conv1", 4), cons(f"{b0}.conv2.0.weight", i4))),
        (f"{b0}.conv2.0", 4, "channel", True, merge(conv_bn(f"{b0}.conv2", 4), cons(f"{b0}.conv3.0.weight", i4))),
        (f"{b0}.conv3.0", 16, "stream", True, merge(
            conv_bn(f"{b0}.conv3", 16), conv_bn(f"{b0}.shortcut", 16), cons(f"{b1}.conv1.0.weight", i16),
            conv_bn(f"{b1}.conv3", 16), cons("head.fc.weight", i16))),
        (f"{b1}.conv1.0", 4, "channel", True, merge(conv_bn(f"{b1}.conv1", 4), cons(f"{b1}.conv2.0.weight", i4))),
        (f"{b1}.conv2.0", 4, "channel", True, merge(conv_bn(f"{b1}.conv2", 4), cons(f"{b1}.conv3.0.weight", i4))),
        classifier("head.fc", "head.fc"),
    ])


def test_tiny_densenet_concat_offsets():
    """Every dense layer's 4 channels sit at an offset in every later BN and conv input:
    8 stem channels, then +4 per layer (offsets 8, 12, 16); the transition restarts at 12."""
    _, _, groups = analysed("tiny_densenet")

    def readers(layers, idx):  # BN + conv columns of each dense layer reading the concat
        return merge(*[merge(bn(f"{p}.norm", idx), cons(f"{p}.conv.weight", idx)) for p in layers])

    def transition(idx):
        return merge(bn("transition.0", idx), cons("transition.2.weight", idx))

    def final(idx):
        return merge(bn("norm", idx), cons("head.fc.weight", idx))

    b1 = ["block1.0", "block1.1", "block1.2"]
    check_groups(groups, [
        ("stem", 8, "channel", True, merge(prod("stem.weight", ident(8)), readers(b1, ident(8)),
                                           transition(ident(8)))),
        ("block1.0.conv", 4, "channel", True, merge(prod("block1.0.conv.weight", ident(4)),
                                                    readers(b1[1:], ident(4, 8)), transition(ident(4, 8)))),
        ("block1.1.conv", 4, "channel", True, merge(prod("block1.1.conv.weight", ident(4)),
                                                    readers(b1[2:], ident(4, 12)), transition(ident(4, 12)))),
        ("block1.2.conv", 4, "channel", True, merge(prod("block1.2.conv.weight", ident(4)),
                                                    transition(ident(4, 16)))),
        ("transition.2", 12, "channel", True, merge(prod("transition.2.weight", ident(12)),
                                                    readers(["block2.0", "block2.1"], ident(12)),
                                                    final(ident(12)))),
        ("block2.0.conv", 4, "channel", True, merge(prod("block2.0.conv.weight", ident(4)),
                                                    readers(["block2.1"], ident(4, 12)), final(ident(4, 12)))),
        ("block2.1.conv", 4, "channel", True, merge(prod("block2.1.conv.weight", ident(4)),
                                                    final(ident(4, 16)))),
        classifier("head.fc", "head.fc"),
    ])


def test_tiny_split_split_chunk_and_concat_offsets():
    """split(16 -> 6 + 10), chunk(10 -> 5 + 5): stem channels 0-5 feed branch_a, 6-10 go
    through max pooling straight into fuse's columns 6-10, 11-15 feed branch_c; the cat
    puts branch_a at columns 0-5 and branch_c's 8 channels at 11-18."""
    _, _, groups = analysed("tiny_split")
    none = lambda n: [[] for _ in range(n)]  # noqa: E731
    check_groups(groups, [
        ("stem.0", 16, "channel", True, merge(
            conv_bn("stem", 16),
            cons("branch_a.0.weight", ident(6) + none(10)),
            cons("fuse.0.weight", none(6) + ident(5, 6) + none(5)),
            cons("branch_c.0.weight", none(11) + ident(5)))),
        ("branch_a.0", 6, "channel", True, merge(conv_bn("branch_a", 6), cons("fuse.0.weight", ident(6)))),
        ("branch_c.0", 8, "channel", True, merge(conv_bn("branch_c", 8), cons("fuse.0.weight", ident(8, 11)))),
        ("fuse.0", 16, "channel", True, merge(conv_bn("fuse", 16), cons("head.fc.weight", ident(16)))),
        classifier("head.fc", "head.fc"),
    ])


def test_tiny_flatten_linear_owns_hw_columns_per_channel():
    """flatten([B, 8, 4, 4]) -> Linear(128): channel c owns columns 16c .. 16c+15."""
    _, _, groups = analysed("tiny_flatten")
    check_groups(groups, [
        ("conv1.0", 8, "channel", True, merge(conv_bn("conv1", 8), cons("conv2.0.weight", ident(8)))),
        ("conv2.0", 8, "channel", True, merge(conv_bn("conv2", 8), cons("fc1.weight", ident(8, per=16)))),
        ("fc1", 32, "channel", True, merge(prod("fc1.weight", ident(32)), bias("fc1.bias", ident(32)),
                                           cons("fc2.weight", ident(32)))),
        classifier("fc2", "fc2"),
    ])


def test_tiny_grouped_conv_group_units():
    """A grouped conv (4 groups) couples its input group k with its output group k, so a
    channel of the group is a whole conv group: 4 inputs (+ 8 outputs of the widening
    16 -> 32 conv). The residual stream through the grouped block inherits the units."""
    _, _, groups = analysed("tiny_grouped")
    g4, g8 = ident(4, per=4), ident(4, per=8)
    check_groups(groups, [
        ("stem.0", 4, "conv-group", True, merge(
            conv_bn("stem", 4, g4), cons("block.conv1.0.weight", g4), conv_bn("block.conv3", 4, g4),
            conv_bn("widen", 4, g8), cons("head.fc.weight", g8))),
        ("block.conv1.0", 4, "conv-group", True, merge(
            conv_bn("block.conv1", 4, g4), conv_bn("block.conv2", 4, g4), cons("block.conv3.0.weight", g4))),
        classifier("head.fc", "head.fc"),
    ])
    # The grouped convs' per-group input dims (size 4) are no group's member.
    assert not any(m.target in ("block.conv2.0.weight", "widen.0.weight") and m.dim == 1
                   for g in groups.values() for m in g.members)


def test_tiny_mobilenet_depthwise_and_inverted_residuals():
    """Depthwise conv: expand's channel i is dw's channel i (one group with two producers);
    the residual adds couple stem with block 0's projection and block 1 with block 2."""
    _, _, groups = analysed("tiny_mobilenet")

    def block(i, hidden):
        b = f"blocks.{i}"
        return (f"{b}.expand.0", hidden, "channel", True, merge(
            conv_bn(f"{b}.expand", hidden), conv_bn(f"{b}.dw", hidden),
            cons(f"{b}.project.0.weight", ident(hidden))))

    check_groups(groups, [
        ("stem.0", 8, "stream", True, merge(
            conv_bn("stem", 8), cons("blocks.0.expand.0.weight", ident(8)),
            conv_bn("blocks.0.project", 8), cons("blocks.1.expand.0.weight", ident(8)))),
        block(0, 32), block(1, 32),
        ("blocks.1.project.0", 16, "stream", True, merge(
            conv_bn("blocks.1.project", 16), cons("blocks.2.expand.0.weight", ident(16)),
            conv_bn("blocks.2.project", 16), cons("head_conv.0.weight", ident(16)))),
        block(2, 64),
        ("head_conv.0", 32, "channel", True, merge(conv_bn("head_conv", 32), cons("head.fc.weight", ident(32)))),
        classifier("head.fc", "head.fc"),
    ])


def test_tiny_se_gating_multiply_couples():
    """x * sigmoid(fc2(...)) couples the gated conv's channels with fc2's rows; the mean
    over H, W keeps channels for fc1's columns; the residual add joins the stem."""
    _, _, groups = analysed("tiny_se")
    i16, i4 = ident(16), ident(4)
    check_groups(groups, [
        ("stem.0", 16, "stream", True, merge(
            conv_bn("stem", 16), cons("conv.0.weight", i16), conv_bn("conv", 16),
            cons("se.fc1.weight", i16), prod("se.fc2.weight", i16), bias("se.fc2.bias", i16),
            cons("head.fc.weight", i16))),
        ("se.fc1", 4, "channel", True, merge(prod("se.fc1.weight", i4), bias("se.fc1.bias", i4),
                                             cons("se.fc2.weight", i4))),
        classifier("head.fc", "head.fc"),
    ])


def test_every_fixture_has_a_golden_test():
    tested = {"tiny_mlp", "tiny_vgg", "tiny_resnet", "tiny_bottleneck", "tiny_densenet",
              "tiny_split", "tiny_flatten", "tiny_grouped", "tiny_mobilenet", "tiny_se",
              "tiny_vit", "tiny_convnext", "tiny_attention"}
    assert set(FIXTURES) == tested


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", FIXTURES)
def test_group_structure_is_consistent(name):
    """Ids unique; index maps in bounds; no tensor index owned twice (within or across
    groups); every group has a producer; the result is JSON-safe and printable."""
    model, _, groups = analysed(name)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    owned: Dict[Tuple[str, int], set] = {}
    for g in groups.values():
        assert g.size >= 1 and g.divisor == 1
        assert any(m.role == "producer" for m in g.members)
        for m in g.members:
            size = tensors[m.target].shape[m.dim]
            seen = owned.setdefault((m.target, m.dim), set())
            for ix in m.index_map:
                assert all(0 <= i < size for i in ix), (g.id, m.target)
                assert not seen & set(ix), f"{m.target} dim {m.dim}: index owned twice"
                seen |= set(ix)
        assert g.to_dict()["members"] and str(g).startswith(f"Group {g.id}")
