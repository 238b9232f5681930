"""The patching heatmaps are built without plotly's validation (probing.plots.fast_figure); each equals the figure
plotly's API builds from the same calls (the reference), as the JSON the HTML embeds."""

import json

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from wordpos.patching.plots import attention_patterns, head_heatmap, position_heatmap


def _same(fast, ref):
    assert json.loads(pio.to_json(fast)) == json.loads(pio.to_json(ref))


def _ref_heads(e, title, colorbar, text_fmt=".2f"):
    lim = float(np.nanmax(np.abs(e))) if np.isfinite(e).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=e, x=[str(h) for h in range(e.shape[1])], y=[str(L) for L in range(e.shape[0])],
        colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim, colorbar=dict(title=colorbar),
        text=np.vectorize(lambda v: "" if not np.isfinite(v) else format(v, text_fmt))(e) if e.size <= 400 else None,
        texttemplate="%{text}" if e.size <= 400 else None,
        hoverongaps=False, hovertemplate="head %{y}.%{x}<br>" + colorbar + " %{z:.3f}<extra></extra>"))
    fig.update_layout(title=dict(text=title, font=dict(size=14)), xaxis_title="head", yaxis_title="layer",
                      template="plotly_white", height=max(320, 40 * e.shape[0] + 160),
                      width=max(680, 28 * e.shape[1] + 220))
    return fig


def test_head_heatmap_equals_plotly_api_figure():
    rng = np.random.default_rng(0)
    small = rng.normal(size=(4, 6))
    small[1, 2] = np.nan  # not measured: a blank cell
    for e in (small, rng.normal(size=(30, 15)), np.full((2, 2), np.nan)):  # ≤ 400 cells with numbers, > 400 without
        _same(head_heatmap(e, "H", "accuracy change"), _ref_heads(e, "H", "accuracy change"))


def test_position_heatmap_equals_plotly_api_figure():
    e = np.random.default_rng(1).normal(size=(3, 5))
    for tokens in (None, ["<s>", "The", "Ġcat", "\n", "x"]):
        x = [f"{i}: {t!r}" for i, t in enumerate(tokens)] if tokens is not None else [str(i) for i in range(5)]
        lim = float(np.nanmax(np.abs(e)))
        ref = go.Figure(go.Heatmap(z=e, x=x, y=["0", "1", "2"], colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim,
                                   colorbar=dict(title="effect"), hoverongaps=False,
                                   hovertemplate="layer %{y}, position %{x}<br>%{z:.3f}<extra></extra>"))
        ref.update_layout(title="P", xaxis_title="position (token)", yaxis_title="layer (resid_pre)",
                          template="plotly_white", height=max(320, 40 * 3 + 200))
        _same(position_heatmap(e, "P", tokens), ref)


def test_attention_patterns_equal_plotly_api_figure():
    rng = np.random.default_rng(2)
    tokens = ["<s>", "ĠThe", "▁cat", "Ċ", "sat", "Ġon", "Ġthe", "Ġmat"]
    for n in (1, 2, 4, 7):
        pats = {f"{i}.{i + 1}": rng.random((8, 8)) for i in range(n)}
        names = list(pats)
        cols = min(3, n)
        rows = (n + cols - 1) // cols
        labels = [f"{i}:{t.replace('Ġ', '␣').replace('▁', '␣').replace('Ċ', '⏎')}"[:14] for i, t in enumerate(tokens)]
        ref = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {m}" for m in names],
                            horizontal_spacing=0.1, vertical_spacing=0.45 / rows)
        for i, m in enumerate(names):
            ref.add_trace(go.Heatmap(z=pats[m][3:], x=labels, y=labels[3:], colorscale="Blues", zmin=0, zmax=1,
                                     showscale=i == 0, colorbar=dict(title="attention"),
                                     hovertemplate=f"head {m}<br>query %{{y}}<br>key %{{x}}<br>%{{z:.3f}}<extra></extra>"),
                          row=i // cols + 1, col=i % cols + 1)
        ref.update_yaxes(autorange="reversed", tickfont=dict(size=8))
        ref.update_xaxes(tickfont=dict(size=8), tickangle=-60)
        ref.update_layout(title="A", template="plotly_white", height=420 * rows + 120, width=max(560, 460 * cols))
        fast = attention_patterns(pats, tokens, "A", query_from=3)
        _same(fast, ref)
        # the JSON-ready dict the attention stage writes: the Figure's JSON (plotly sorts numbered axes' keys)
        plain = attention_patterns(pats, tokens, "A", query_from=3, as_dict=True)
        assert json.loads(pio.to_json(plain, validate=False)) == json.loads(pio.to_json(fast))
