"""The circuit diagram in a real browser: headless Chromium opens the standalone HTML from disk (no network),
and a probe script reports console errors and the markers drawn by the "nodes" trace."""

import json
import re
import shutil
import subprocess

import pytest

from wordpos.circuit import render_circuit, save_circuit_figure
from wordpos.circuit.render import drawn_node_count


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
const origError = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); origError(...a); };
window.addEventListener('load', () => setTimeout(() => {
  const out = document.createElement('pre');
  out.id = 'wordpos-probe';
  let drawn = -1, names = [];
  try {
    const gd = document.querySelector('.plotly-graph-div');
    const full = gd._fullData.find(t => t.name === 'nodes');   // the one "nodes" trace, found by its uid
    const group = gd.querySelector('.scatterlayer .trace' + full.uid);
    drawn = group.querySelectorAll('path.point').length;
    names = full.meta;
  } catch (e) { window.__errors.push('probe: ' + e); }
  out.textContent = JSON.stringify({drawn: drawn, names: names, errors: window.__errors, plotly: typeof Plotly});
  document.body.appendChild(out);
}, 1500));
</script>
"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_diagram_renders_in_chromium_with_every_node(synthetic, tmp_path):
    fig = render_circuit(synthetic)
    assert drawn_node_count(fig) == synthetic.number_of_nodes()
    written = save_circuit_figure(fig, tmp_path, png=False, svg=False)
    html = [p for p in written["circuit"] if p.suffix == ".html"][0]
    text = html.read_text()
    assert not re.search(r'<script[^>]+src=["\']https?:', text)  # plotly.js embedded, no CDN: works offline
    assert len(text) > 1_000_000
    html.write_text(text.replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--enable-logging=stderr",
           "--v=0", "--dump-dom", html.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="wordpos-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"probe script did not run; stderr: {proc.stderr[-2000:]}"
    result = json.loads(m.group(1).replace("&quot;", '"'))
    assert result["plotly"] == "object"
    assert result["errors"] == []
    assert "Uncaught" not in proc.stderr
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and re.search(r"error|Uncaught", ln, re.I)]
    assert console == []
    assert result["drawn"] == synthetic.number_of_nodes()
    assert sorted(result["names"]) == sorted(synthetic.nodes)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_pruned_diagram_renders_in_chromium(synthetic, tmp_path):
    from wordpos.circuit import prune_min_edges

    test_diagram_renders_in_chromium_with_every_node(prune_min_edges(synthetic, 0.9).graph, tmp_path)
