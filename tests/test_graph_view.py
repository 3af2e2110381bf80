"""The pictures a person reads (fxprune.graph_view, fxprune.plot): content checks, fast.

The group picture must be self-contained (no http(s) URL but the SVG namespace), show
every group, follow the layer order of the traced graph, and stay bounded in width when
the model has many groups; the keep-ratio chart must grow in height, not shrink its
labels. The screenshots in a real browser are in test_pictures_browser.py (slow).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
import torch

import fxprune
from fxprune.graph_view import COL_W, layout, to_html, to_svg
from fxprune.group import Group, Member
from fxprune.models import create_model, model_input_size
from fxprune.plot import plot_keep_ratios, short_name
from fxprune.report import GroupRow, Report

SVG_NS = "http://www.w3.org/2000/svg"


def analysed(name: str):
    model = create_model(name).eval()
    x = torch.randn(1, *model_input_size(name))
    return fxprune.groups(model, x), fxprune.connectivity(model, x)


def svg_width(text: str) -> int:
    return int(re.search(r"<svg[^>]* width='(\d+)'", text).group(1))


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_vit"])
def test_pictures_are_self_contained_and_show_every_group(name):
    found, conn = analysed(name)
    svg = to_svg(found, conn.layers, name, conn.within)
    page = to_html(found, conn.layers, name, conn.within)
    root = ET.fromstring(svg)  # a well-formed standalone SVG document
    assert root.tag == f"{{{SVG_NS}}}svg"
    assert set(re.findall(r"https?://[^\s'\"<>]+", svg)) == {SVG_NS}
    assert not re.search(r"https?://", page), "the HTML page must load nothing"
    assert not re.search(r"\b(src|href)=", page) and "@import" not in page
    drawn = set(re.findall(r"data-group='([^']+)'", svg))
    assert drawn == {g.id for g in found}   # every group has a band (all have a layer)
    for g in found:
        assert f"<code>{g.id}</code>" in page   # and a row of the HTML table
    assert svg_width(svg) <= 900
    script = page.split("id='fxdata'>", 1)[1].split("</script>", 1)[0]
    assert "</" not in script


def test_rows_follow_layer_order_and_marks_follow_roles():
    found, conn = analysed("tiny_vit")
    lay = layout(found, conn.layers)
    assert lay.rows == [name for name in conn.layers if name in lay.rows]
    assert lay.rows.index("blocks.0.attn.qkv") < lay.rows.index("blocks.0.attn.proj")
    heads = next(b for b in lay.bands if b.group.kind == "head")
    qkv, proj = heads.group.id, heads.group.id.replace("qkv", "proj")
    assert heads.marks[lay.rows.index(qkv)] == "producer"
    assert heads.marks[lay.rows.index(proj)] == "consumer"
    assert (heads.start, heads.end) == (min(heads.marks), max(heads.marks))
    svg = to_svg(found, conn.layers, within=conn.within)
    assert "blocks.0.attn.qkv ⊗" in svg and "blocks.0.attn.proj ⊗" not in svg


def chain(n: int):
    """``n`` groups of a plain chain of Linear layers: group i is produced by layer i and
    consumed by layer i + 1 (the shape of a deep CNN without residuals)."""
    return [Group(f"l{i}", 8, [Member(f"l{i}.weight", 0, [[c] for c in range(8)], "producer"),
                              Member(f"l{i + 1}.weight", 1, [[c] for c in range(8)],
                                     "consumer")]) for i in range(n)]


def test_width_is_bounded_by_overlap_not_by_the_number_of_groups():
    """Bands that do not overlap share a column: 200 chained groups need 2 columns, and the
    picture is as wide as for 3 groups (the old DOT star grew with every group)."""
    few, many = chain(3), chain(200)
    assert layout(many).ncols == 2
    assert svg_width(to_svg(many)) == svg_width(to_svg(few))
    # a group alive across every layer (a residual stream) adds exactly one column
    stream = Group("stream", 4, [Member(f"l{i}.weight", 1, [[c] for c in range(4)], "consumer")
                                 for i in range(201)])
    assert layout(many + [stream]).ncols == 3
    assert svg_width(to_svg(many + [stream])) <= svg_width(to_svg(many)) + COL_W


def test_layout_without_order_and_groups_without_a_layer():
    found = chain(2) + [Group("tokens", 4, [Member("cls_token", 2, [[c] for c in range(4)])])]
    lay = layout(found)
    assert lay.rows == ["l0", "l1", "l2"] and [g.id for g in lay.elsewhere] == ["tokens"]
    assert "tokens" in to_html(found)


def test_short_name_keeps_both_ends():
    name = "stages.3.blocks.11.attn.qkv_projection_with_a_long_name"
    short = short_name(name, 24)
    assert len(short) == 24 and short.startswith("stages.3.bl") and short.endswith("long_name")
    assert short_name("layer1.conv1") == "layer1.conv1"


def report_with(n: int) -> Report:
    rows = [GroupRow(f"blocks.{i}.mlp.fc1", "channel", 64, 64 - i % 40, True) for i in range(n)]
    rows.append(GroupRow("head", "channel", 10, 10, False, "reaches the model output"))
    return Report(1000, 500, 100, 60, rows)


def test_keep_ratio_chart_grows_with_the_groups_and_keeps_its_labels(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    sizes = {}
    for n in (4, 60):
        path = plot_keep_ratios(report_with(n), str(tmp_path / f"k{n}.png"))
        with Image.open(path) as im:
            sizes[n] = im.size
        svg = plot_keep_ratios(report_with(n), str(tmp_path / f"k{n}.svg"))
        text = open(svg).read()
        assert "blocks.0.mlp.fc1" in text and "64/64" in text and "kept" in text
    assert sizes[4][0] == sizes[60][0]          # same width, labels not squeezed
    assert sizes[60][1] > sizes[4][1] + 56 * 20  # ≥ 20 px per extra row
