"""Screenshots of the pictures in a real headless browser (slow; needs chromium or firefox).

The group graph (SVG and HTML) of a ResNet-18 and a ViT-S/16, and the keep-ratio chart
inside the HTML report, are rendered by the browser with the network unreachable in
principle (the pages reference nothing); each screenshot must be a real picture: the
page's size, mostly white, with coloured bands and text drawn (many distinct colours,
a fair share of non-white pixels).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.cli.graph import write_graph
from fxprune.cli.report import report_html
from fxprune.report import GroupRow, Report

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "firefox-esr", "firefox")


def browser():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless browser installed (apt-get install -y chromium, or firefox-esr)")


def screenshot(page: Path, out: Path, width: int, height: int) -> Path:
    exe = browser()
    if "firefox" in Path(exe).name:
        cmd = [exe, "--headless", "--screenshot", str(out), f"--window-size={width},{height}"]
    else:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--screenshot={out}", f"--window-size={width},{height}"]
    done = subprocess.run(cmd + [page.resolve().as_uri()], capture_output=True, timeout=120)
    assert out.exists(), done.stderr.decode(errors="replace")[-500:]
    return out


def assert_real_picture(png: Path, width: int, height: int) -> None:
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (width, height)
        raw = im.convert("RGB").resize((width // 2, height // 2)).tobytes()
    pixels = [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]
    colours = set(pixels)
    inked = sum(1 for p in pixels if min(p) < 200) / len(pixels)
    assert len(colours) > 50, f"{png.name}: {len(colours)} colours, a blank or flat page"
    assert 0.01 < inked < 0.6, f"{png.name}: {inked:.1%} of the pixels drawn"


def models():
    tv = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return {"resnet18": (tv.models.resnet18(weights=None).eval(), 224),
            "vit": (timm.create_model("vit_small_patch16_224", img_size=96).eval(), 96)}


@pytest.mark.parametrize("ext", ["svg", "html"])
def test_group_graph_screenshots(tmp_path, ext):
    for name, (model, size) in models().items():
        x = torch.randn(1, 3, size, size)
        found, conn = fxprune.groups(model, x), fxprune.connectivity(model, x)
        page = tmp_path / f"{name}.{ext}"
        write_graph(found, str(page), name, conn.layers, conn.within)
        text = page.read_text()
        if ext == "svg":
            w, h = (int(v) for v in re.search(r"width='(\d+)' height='(\d+)'", text).groups())
        else:
            w, h = 1200, 1400
        assert w <= 1200, f"{name}: the picture is {w} px wide"
        png = screenshot(page, tmp_path / f"{name}_{ext}.png", w, min(h, 4000))
        assert_real_picture(png, w, min(h, 4000))


def test_keep_ratio_report_screenshot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [GroupRow(f"layer{i // 4 + 1}.{i % 4}.conv1", "channel", 64 * (1 + i // 4),
                     40 + 3 * i, True) for i in range(12)]
    rows.append(GroupRow("fc", "channel", 1000, 1000, False, "reaches the model output"))
    page = tmp_path / "report.html"
    page.write_text(report_html(Report(1000, 500, 100, 61, rows)))
    assert_real_picture(screenshot(page, tmp_path / "report.png", 1000, 1400), 1000, 1400)
