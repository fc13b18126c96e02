"""`dvc plots show` / `plots diff` pages draw in a real headless browser with no network.

The project's HTML template (.dvc/plots/offline.html, set by `plots.html_template` in
.dvc/config) carries vega, vega-lite and vega-embed inline. Chromium runs with a dead proxy,
so any request would fail; the charts must still draw: SVG marks in the DOM (the loss line,
one bar per metric and model) and a screenshot with the loss curve's colour in it. DVC's own
CDN template, rendered the same way, draws nothing — the check can fail.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from stages.tools.plots import browse, screenshot
from tests.conftest import REPO, bin_path, run

OFFLINE = "--proxy-server=127.0.0.1:9"  # a closed port: no request can succeed
LOSS_COLOUR = (0x94, 0x5D, 0xD6)  # DVC's first revision colour (#945dd6): the loss line


def headless(page: Path, *args: str) -> str:
    return browse(page, OFFLINE, "--window-size=1000,1400", *args)


def marks(dom: str, kind: str) -> list[int]:
    """Per vega mark group of `kind` (line, rect, ...), how many SVG paths it drew."""
    groups = re.findall(rf'<g class="mark-{kind} role-mark[^"]*"[^>]*>(.*?)</g>', dom, re.S)
    return [len(re.findall(r'<path [^>]*d="M', g)) for g in groups]


@pytest.fixture(scope="module")
def plots_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default pipeline's dvc.yaml and .dvc config with its committed loss and eval plots."""
    root = tmp_path_factory.mktemp("plots")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "plots", root / "plots")
    run(["git", "init", "-q"], root)
    run([bin_path("dvc"), "init", "-q"], root)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "accepted run"], root)
    return root


def test_plots_show_draws_loss_and_eval_metrics_offline(plots_project: Path, tmp_path: Path) -> None:
    run([bin_path("dvc"), "plots", "show", "-o", str(tmp_path / "show")], plots_project)
    page = tmp_path / "show" / "index.html"
    html = page.read_text()
    assert not re.search(r"<script[^>]+src=", html)  # nothing to fetch: every script is inline
    dom = headless(page, "--dump-dom")
    assert sum(marks(dom, "line")) == 2, marks(dom, "line")  # the loss and its smoothed line, one revision
    rows = json.loads((plots_project / "plots" / "eval.json").read_text())
    assert {r["model"] for r in rows} == {"base", "tuned"} and len(rows) >= 6
    assert sum(marks(dom, "rect")) == len(rows)  # one bar per metric for base and for tuned
    shot = tmp_path / "plots_show.png"
    screenshot(page, shot, 1000, 1400, OFFLINE)
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    loss = int((np.abs(pixels - LOSS_COLOUR) < 40).all(axis=1).sum())
    inked = int((pixels.sum(axis=1) < 600).sum())
    print(f"screenshot {shot}: {loss} loss-line pixels, {inked} non-white of {len(pixels)}")
    assert loss > 300 and inked > 10_000, (loss, inked)


def test_plots_diff_overlays_two_revisions_offline(plots_project: Path, tmp_path: Path) -> None:
    """`dvc plots diff` against the committed run: two loss lines, two bars per metric and model."""
    rows = json.loads((plots_project / "plots" / "eval.json").read_text())
    changed = tmp_path / "project"
    shutil.copytree(plots_project, changed)
    (changed / "plots" / "eval.json").write_text(json.dumps([r | {"value": r["value"] / 2} for r in rows]))
    csv = (changed / "plots" / "train_loss.csv").read_text().splitlines()
    (changed / "plots" / "train_loss.csv").write_text("\n".join(csv[: len(csv) // 2]) + "\n")
    run([bin_path("dvc"), "plots", "diff", "HEAD", "-o", str(tmp_path / "diff")], changed)
    dom = headless(tmp_path / "diff" / "index.html", "--dump-dom")
    assert sum(marks(dom, "line")) == 4, marks(dom, "line")  # loss + smoothed, per revision
    assert sum(marks(dom, "rect")) == 2 * len(rows)
    assert "workspace" in dom and "HEAD" in dom  # legend names both revisions


def test_the_default_cdn_template_draws_nothing_here(plots_project: Path, tmp_path: Path) -> None:
    """The control: the same plots with DVC's stock template (vega from a CDN) stay blank offline."""
    from dvc_render.html import PAGE_HTML

    stock = tmp_path / "stock.html"
    stock.write_text(PAGE_HTML)
    run(
        [bin_path("dvc"), "plots", "show", "--html-template", str(stock), "-o", str(tmp_path / "cdn")],
        plots_project,
    )
    html = (tmp_path / "cdn" / "index.html").read_text()
    assert "cdn.jsdelivr.net" in html
    dom = headless(tmp_path / "cdn" / "index.html", "--dump-dom")
    assert marks(dom, "line") == [] and marks(dom, "rect") == []
