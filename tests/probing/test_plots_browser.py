"""The figures ``wordpos run`` writes from their JSON-ready dicts (``as_dict=True``), drawn by a real browser:
headless Chromium opens each standalone page from disk and the drawn SVG is compared with the one drawn from the
page the plotly Figure writes (the reference), up to plotly.js' random ids."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from wordpos.patching.plots import attention_patterns
from wordpos.probing.plots import confusion_heatmap, key_plot, layer_curve, save_figures

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _drawn(html, profile):
    """The page's DOM after plotly.js drew it, without the scripts and without its random ids."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", html.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    dom = re.sub(r"<script.*?</script>", "", dom, flags=re.S)
    dom = re.sub(r'id="[^"]*"', 'id=""', dom)  # (element ids and the references to them are random)
    dom = re.sub(r"url\([^)]*\)", "url()", dom)
    return re.sub(r"(trace|cb)[0-9a-f]{6}", r"\1", dom)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_figures_written_as_dicts_draw_as_the_figures_do(tmp_path):
    rng = np.random.default_rng(0)
    yt = rng.integers(0, 4, 300)
    yp = np.where(rng.random(300) < 0.7, yt, rng.integers(0, 4, 300))
    pos = 19 + yt * 2 + rng.integers(0, 3, 300)
    tokens = ["<s>", "ĠThe", "▁cat", "Ċ", "sat", "Ġon", "Ġthe", "Ġmat"]
    pats = {f"{i}.{i + 1}": rng.random((8, 8)) for i in range(4)}
    make = {"key_plot": lambda d: key_plot(pos, yt, yp, "K", as_dict=d),
            "layer_curve": lambda d: layer_curve({0: 0.3, 1: 0.6, 2: 0.9}, 0.5, "L", shuffled=0.14, as_dict=d),
            "confusion": lambda d: confusion_heatmap(rng.integers(0, 20, (4, 4)).tolist(), "C", as_dict=d),
            "patterns": lambda d: attention_patterns(pats, tokens, "A", query_from=3, as_dict=d)}
    for name, fig in make.items():
        rng = np.random.default_rng(1)  # (the confusion counts drawn alike for both)
        save_figures({name: fig(False)}, tmp_path / "figure", png=False)
        rng = np.random.default_rng(1)
        save_figures({name: fig(True)}, tmp_path / "dict", png=False)
        ref = _drawn(tmp_path / "figure" / f"{name}.html", tmp_path / "profile")
        got = _drawn(tmp_path / "dict" / f"{name}.html", tmp_path / "profile")
        assert 'class="main-svg"' in ref and ("point" in ref or "hm" in ref), name  # plotly.js drew the plot
        assert got == ref, name
