"""DVC plots that work offline: the vendored HTML template, and a headless-browser screenshot.

`dvc plots show` / `plots diff` write an HTML page whose default template loads vega,
vega-lite and vega-embed from a CDN, so on a machine without internet the page stays blank.
The project sets `plots.html_template` (.dvc/config) to `.dvc/plots/offline.html`, which
carries the three libraries inline (built here from their npm tarballs), and renders to SVG.

The eval stage's own plot rows are written by `stages/evaluate/plot_rows.py`; nothing here
runs in a pipeline stage, so editing it re-runs none.

Refresh the vendored libraries (needs npm): `python -m stages.tools.plots vendor vega@5 vega-lite@5 vega-embed@6`.
A PNG of a plots page for a CI comment (headless Chromium, no network needed):
`python -m stages.tools.plots screenshot dvc_plots/index.html loss.png`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from stages.core.io import atomic_file

TEMPLATE = Path(".dvc/plots/offline.html")
# (npm package, file inside its tarball); order matters: vega-embed needs the other two as globals
LIBRARIES = (
    ("vega", "package/build/vega.min.js"),
    ("vega-lite", "package/build/vega-lite.min.js"),
    ("vega-embed", "package/build/vega-embed.min.js"),
)
# DVC calls `vegaEmbed('#id', spec)` with no options; default to SVG (marks are DOM elements,
# crisp when printed) and keep the export menu, which works offline.
EMBED_DEFAULTS = """
(function () {
  var embed = window.vegaEmbed;
  window.vegaEmbed = function (el, spec, opts) {
    return embed(el, spec, Object.assign({renderer: "svg"}, opts || {}));
  };
})();
"""


def offline_template(scripts: list[tuple[str, str]]) -> str:
    """A DVC HTML template (`{plot_divs}`, `{refresh_tag}`) with the given (name, js) inline."""
    for name, js in scripts:
        for bad in ("</script", "{plot_divs}", "{refresh_tag}", "{scripts}"):
            if bad in js:  # would end the tag early, or be replaced by DVC's template filling
                raise ValueError(f"{name}: contains {bad!r}; cannot inline it")
    inline = "\n".join(f"<!-- {name} -->\n<script>\n{js}\n</script>" for name, js in scripts)
    return f"""<!DOCTYPE html>
<html>
<head>
{{refresh_tag}}
<meta charset="utf-8">
<title>sftflow plots</title>
<!-- Offline DVC plots template: vega, vega-lite and vega-embed are inline (BSD-3-Clause,
     built by `python -m stages.tools.plots`), so the page renders with no network. -->
{inline}
<script>{EMBED_DEFAULTS}</script>
<style>
  body {{ font-family: sans-serif; }}
  body > div {{ margin: 1em 0; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def vendor(specs: list[str], out: Path = TEMPLATE) -> dict[str, str]:
    """`npm pack` each package spec, inline its minified build into the template at `out`."""
    versions, scripts = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for spec, (name, member) in zip(specs, LIBRARIES):
            if not spec.split("@")[0] == name:
                raise ValueError(f"expected {name}@<version>, got {spec}")
            packed = subprocess.run(
                ["npm", "pack", spec, "--json"], cwd=tmp, check=True, capture_output=True, text=True
            )
            info = json.loads(packed.stdout)[0]
            with tarfile.open(Path(tmp) / info["filename"]) as tar:
                js = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
            versions[name] = info["version"]
            scripts.append((f"{name}@{info['version']}", js))
    with atomic_file(out) as tmp_out:
        tmp_out.write_text(offline_template(scripts), encoding="utf-8")
    return versions


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Root in CI needs --no-sandbox. Without the background-networking flags Chromium keeps retrying
# refused connections on a closed network and a headless run can hang.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",  # let vega-embed's asynchronous rendering finish first
)


def find_browser() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    raise FileNotFoundError("no chromium on PATH: `bash setup.sh` installs it (apt-get install -y chromium)")


def browse(page: Path, *args: str, timeout_s: int = 120) -> str:
    """Load `page` in headless Chromium with a fresh profile; returns stdout (e.g. --dump-dom)."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                find_browser(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                *args,
                Path(page).resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def screenshot(page: Path, png: Path, width: int = 1000, height: int = 1400, *args: str) -> Path:
    """A PNG of the rendered page (e.g. a `dvc plots diff` page for a CML comment)."""
    browse(page, f"--screenshot={Path(png).resolve()}", f"--window-size={width},{height}", *args)
    return Path(png)


if __name__ == "__main__":
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("vendor", [])
    if command == "vendor":
        print(vendor(rest or ["vega@5", "vega-lite@5", "vega-embed@6"]))
    elif command == "screenshot":
        page, png, *size = rest
        print(screenshot(Path(page), Path(png), *(int(x) for x in size)))
    else:
        sys.exit("usage: python -m stages.tools.plots vendor [SPEC...] | screenshot PAGE PNG [WIDTH HEIGHT]")
