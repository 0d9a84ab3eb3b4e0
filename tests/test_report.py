"""Reports: the HTML page renders in a real headless Chromium (Debian's package), images inline."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from diffalign.report import image_grid, save_png, tag_bars, write_report

from conftest import chromium_screenshot_cmd


def _report(tmp_path):
    rng = np.random.default_rng(0)
    grid = save_png(
        image_grid((rng.random((16, 32, 32, 3)) * 255).astype(np.uint8), 8, scale=3), tmp_path / "grid.png"
    )
    bars = tag_bars(
        {"base": {"colors": 0.4, "position": 0.1}, "aligned": {"colors": 0.6, "position": 0.2}},
        tmp_path / "bars.png",
    )
    return write_report(
        tmp_path,
        "test report",
        "| tag | base |\n|---|---|\n| colors | 0.4 |",
        [("Samples", grid, "a grid"), ("Per tag", bars, "bars")],
        {"overall": 0.25},
    )


def test_report_files(tmp_path):
    page = _report(tmp_path)
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2 and "<h2>Per tag</h2>" in html
    assert (tmp_path / "report.md").read_text().count("![") == 2


def test_report_renders_tables_captions_and_lists(tmp_path):
    """One renderer for every report: markdown tables become HTML tables (not preformatted text),
    captioned images become figures with their caption, a list of items an ordered list; all escaped."""
    img = save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    page = write_report(
        tmp_path,
        "t",
        "intro & more\n\n| tag | base |\n|---|---|\n| **overall** | 0.4 |\n| **overall** (95% CI) | <0.5> |",
        [("Pairs", [(img, "a <b> & c"), (img, "two")], ["first <x>", "second"])],
        {},
    )
    html = page.read_text()
    assert "<pre>" not in html and "<p>intro &amp; more</p>" in html
    assert (
        "<table><tr><th>tag</th><th>base</th></tr><tr><td><b>overall</b></td><td>0.4</td></tr>"
        "<tr><td><b>overall</b> (95% CI)</td><td>&lt;0.5&gt;</td></tr></table>" in html
    )
    assert html.count("<figure>") == 2 and "<figcaption>a &lt;b&gt; &amp; c</figcaption>" in html
    assert "<ol><li>first &lt;x&gt;</li><li>second</li></ol>" in html and "<b> &" not in html
    md = (tmp_path / "report.md").read_text()
    assert "1. first <x>" in md and "![a <b> & c](a.png)" in md


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium not installed (.ci/run installs it)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    page = _report(tmp_path)
    shot = tmp_path / "shot.png"
    cmd = chromium_screenshot_cmd(f"file://{page}", shot)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "Page load failed" not in p.stderr and ":CONSOLE(" not in p.stderr, p.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] > 500
    assert (img < 200).any(axis=-1).mean() > 0.01  # something was drawn, not a blank page


def test_loss_curve_plots_keys_logged_on_some_steps_only(tmp_path):
    """An online run's metrics.jsonl: a guard row first (no loss), the reward once per round of 2
    steps: every requested key that appears anywhere gets a panel (4 in wide each), plotted over the
    rows that carry it; a key never logged is left out."""
    import json

    from PIL import Image

    from diffalign.report import loss_curve

    rows = [{"step": 0, "guard/gold": 0.2}]
    rows += [{"step": s, "loss": 1.0 / s, **({"reward": 0.1 * s} if s % 2 else {})} for s in range(1, 9)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = loss_curve(metrics, tmp_path / "curve.png", ("loss", "implicit_acc", "reward"))
    width, height = Image.open(out).size
    assert (width, height) == (800, 300)  # two panels at 4 x 3 inches, 100 dpi
