"""The edge-circuit diagram in a real browser: headless Chromium opens the standalone HTML from disk (no network);
a probe script checks the offline slider, counts the edge markers drawn in the default view (≤ 200), then applies
the "top 10" step the way the slider does and counts again."""

import html as html_lib
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from wordpos.circuit.edge_render import drawn_edge_count, render_edge_circuit, save_edge_circuit_figure, step_sizes
from wordpos.patching.edge_graph import EdgeGraph, EdgeScores

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
const origError = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); origError(...a); };
function drawnEdges(gd) {
  const shown = gd._fullData.filter(t => t.name.startsWith('edges (top') && t.visible === true);
  let n = 0;
  for (const t of shown) n += gd.querySelectorAll('.scatterlayer .trace' + t.uid + ' path.point').length;
  return {traces: shown.length, drawn: n, names: shown.length ? shown[0].meta : []};
}
function lineSegments(gd) {  // separate sub-paths ('M' moves) of the visible edge-line traces: one per edge
  const lines = gd._fullData.filter(t => / edges \(top /.test(t.name) && t.visible === true);
  let m = 0;
  for (const t of lines)
    for (const p of gd.querySelectorAll('.scatterlayer .trace' + t.uid + ' path.js-line'))
      m += ((p.getAttribute('d') || '').match(/M/g) || []).length;
  return {traces: lines.length, segments: m};
}
window.addEventListener('load', () => setTimeout(async () => {
  const out = document.createElement('pre');
  out.id = 'wordpos-probe';
  const res = {errors: window.__errors, plotly: typeof Plotly};
  try {
    const gd = document.querySelector('.plotly-graph-div');
    const sl = (gd.layout.sliders || [])[0];
    res.slider_labels = sl ? sl.steps.map(s => s.label) : [];
    res.slider_dom = gd.querySelectorAll('.slider-container').length;
    res.default = drawnEdges(gd);
    res.lines = lineSegments(gd);
    const step = sl.steps.find(s => s.label === 'top 10');
    await Plotly.update(gd, step.args[0]);
    res.top10 = drawnEdges(gd);
  } catch (e) { window.__errors.push('probe: ' + e); }
  out.textContent = JSON.stringify(res);
  document.body.appendChild(out);
}, 1500));
</script>
"""


def _big_circuit():
    """A SmolLM2-sized graph (20 layers, 9 query / 3 key-value heads) and its 350 top-|score| edges."""
    g = EdgeGraph.build(20, 9, 3, 19)
    rng = np.random.default_rng(0)
    s = EdgeScores(g, torch.tensor(rng.normal(size=tuple(g.valid.shape))), "eap-ig", "m", 8)
    return g, s.top_edges(350)


def test_slider_steps_and_default_view_in_python():
    g, edges = _big_circuit()
    fig = render_edge_circuit(g, edges)
    assert [st.label for st in fig.layout.sliders[0].steps] == ["top 10", "top 20", "top 50", "top 100", "top 200",
                                                                "all 350"]
    assert drawn_edge_count(fig) == 200
    shown = [t for t in fig.data if (t.name or "").startswith("edges (top") and t.visible is not False]
    assert len(shown) == 1
    top200 = sorted(edges, key=lambda e: -abs(e[1]))[:200]
    assert sorted(shown[0].meta) == sorted(n for n, _ in top200)
    assert step_sizes(7) == [7] and step_sizes(30) == [10, 20, 30] and step_sizes(5000)[-1] == 200


def test_unvalidated_figure_serialises_as_plotlys_validated_one():
    """The diagram is built without plotly's validation (plots.fast_figure); plotly's validated construction of the
    same dicts is the reference: the figures serialise identically."""
    g, edges = _big_circuit()
    info = {"f =": "0.81 [0.62, 0.96]", "ablation:": "counterfactual"}
    fast = render_edge_circuit(g, edges, title="t", info=info)
    ref = render_edge_circuit(g, edges, title="t", info=info, validate=True)
    assert fast.to_dict() == ref.to_dict()
    assert json.loads(fast.to_json()) == json.loads(ref.to_json())  # the HTML's figure (key order aside)
    # the JSON-ready dict wordpos run writes (no Figure made): the Figure's to_dict, key order included
    plain = render_edge_circuit(g, edges, title="t", info=info, as_dict=True)
    assert json.dumps(plain) == json.dumps(fast.to_dict())


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_edge_diagram_slider_in_chromium(tmp_path):
    g, edges = _big_circuit()
    fig = render_edge_circuit(g, edges, title="test circuit")
    written = save_edge_circuit_figure(fig, tmp_path, png=False)
    html = [p for p in written["circuit"] if p.suffix == ".html"][0]
    text = html.read_text()
    assert not re.search(r'<script[^>]+src=["\']https?:', text)  # plotly.js embedded, no CDN: works offline
    html.write_text(text.replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--enable-logging=stderr",
           "--v=0", "--dump-dom", html.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="wordpos-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"probe script did not run; stderr: {proc.stderr[-2000:]}"
    res = json.loads(html_lib.unescape(m.group(1)))
    assert res["plotly"] == "object" and res["errors"] == []
    assert res["slider_labels"] == ["top 10", "top 20", "top 50", "top 100", "top 200", "all 350"]
    assert res["slider_dom"] >= 1
    assert res["default"]["traces"] == 1 and res["default"]["drawn"] == 200 <= 200
    # each edge its own curve: the gaps between the edges of one line trace hold in plotly.js (NaN in a typed array)
    assert res["lines"]["traces"] >= 1 and res["lines"]["segments"] == 200
    top10 = sorted(edges, key=lambda e: -abs(e[1]))[:10]
    assert res["top10"]["drawn"] == 10 and sorted(res["top10"]["names"]) == sorted(n for n, _ in top10)
