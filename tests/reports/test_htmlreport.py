"""`evaluate --html`: one self-contained file, rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def html_report(chain, tmp_path_factory):
    import pandas as pd

    from mavl_cli.io.mavlfile import read_file
    from tests.conftest import run_cli

    d, ph = chain["dir"], chain["phantoms"]
    out = tmp_path_factory.mktemp("html")
    ids = read_file(d / "test.st").ids()
    rng = np.random.default_rng(0)
    meta = out / "meta.csv"
    pd.DataFrame({"path": ids, "sex": rng.choice(["F", "M"], len(ids)), "age": rng.integers(20, 90, len(ids))}).to_csv(meta, index=False)
    page = out / "report.html"
    r = run_cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {ph.splits['test']} --metadata {meta} --by sex "
                f"--by 'age:0,50' --bootstrap 50 --html {page}")
    assert r.exit_code == 0, r.stderr
    return page


def test_html_is_self_contained(html_report):
    text = html_report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text, re.I)  # nothing fetched
    assert "default-src 'none'" in text  # and the browser is told to fetch nothing
    for piece in ("Per label", "ROC curves", "Reliability diagram", "Subgroups by sex", "Subgroups by age:0,50",
                  "Provenance", "95% CI", "<svg"):
        assert piece in text, piece


def test_html_renders_in_chromium(html_report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium); the browser rendering test needs it")
    from PIL import Image

    shot = tmp_path / "report.png"
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}"]
    r = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2600", html_report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr[-2000:]
    with Image.open(shot) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    assert rgb.shape[0] >= 2000 and rgb.shape[1] >= 1200
    # rendered text and tables: plenty of dark pixels; curves: saturated colours (the palette)
    dark = (rgb.sum(axis=2) < 200).mean()
    colour = ((rgb.max(axis=2) - rgb.min(axis=2)) > 80).mean()
    assert dark > 0.003 and colour > 0.0005, (dark, colour)
    dom = subprocess.run([*base, "--dump-dom", html_report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "Subgroups by sex" in dom and dom.count("<svg") == 3 and dom.count("<table") >= 5
