"""Patching heatmaps: layer × head (and layer × position), diverging colour scale centred on 0."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from wordpos.probing.plots import fast_figure, figure_dict, subplot_axes, subplot_grid, subplot_layout


def head_heatmap(effects: np.ndarray, title: str, colorbar: str = "effect", text_fmt: str = ".2f") -> go.Figure:
    """``effects[layer, head]`` as a heatmap with heads on x and layers on y (layer 0 at the bottom); NaN (not
    measured) is drawn as a blank cell, without a number or hover value."""
    e = np.asarray(effects, dtype=float)
    lim = float(np.nanmax(np.abs(e))) if np.isfinite(e).any() else 1.0
    trace = dict(type="heatmap", z=e, x=[str(h) for h in range(e.shape[1])], y=[str(L) for L in range(e.shape[0])],
                 colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim, colorbar=dict(title={"text": colorbar}),
                 hoverongaps=False, hovertemplate="head %{y}.%{x}<br>" + colorbar + " %{z:.3f}<extra></extra>")
    if e.size <= 400:
        trace.update(text=np.vectorize(lambda v: "" if not np.isfinite(v) else format(v, text_fmt))(e),
                     texttemplate="%{text}")
    return fast_figure([trace], dict(title=dict(text=title, font=dict(size=14)), xaxis=dict(title={"text": "head"}),
                                     yaxis=dict(title={"text": "layer"}), template="plotly_white",
                                     height=max(320, 40 * e.shape[0] + 160), width=max(680, 28 * e.shape[1] + 220)))


def position_heatmap(effects: np.ndarray, title: str, tokens: Sequence[str] | None = None,
                     colorbar: str = "effect") -> go.Figure:
    """``effects[layer, pos]`` with the (first pair's) tokens as x labels."""
    e = np.asarray(effects, dtype=float)
    x = [f"{i}: {t!r}" for i, t in enumerate(tokens)] if tokens is not None else [str(i) for i in range(e.shape[1])]
    lim = float(np.nanmax(np.abs(e))) if np.isfinite(e).any() else 1.0
    trace = dict(type="heatmap", z=e, x=x, y=[str(L) for L in range(e.shape[0])], colorscale="RdBu", zmid=0,
                 zmin=-lim, zmax=lim, colorbar=dict(title={"text": colorbar}), hoverongaps=False,
                 hovertemplate="layer %{y}, position %{x}<br>%{z:.3f}<extra></extra>")
    return fast_figure([trace], dict(title=title, xaxis=dict(title={"text": "position (token)"}),
                                     yaxis=dict(title={"text": "layer (resid_pre)"}), template="plotly_white",
                                     height=max(320, 40 * e.shape[0] + 200)))


def attention_patterns(patterns: dict[str, np.ndarray], tokens: Sequence[str], title: str,
                       query_from: int = 0, *, as_dict: bool = False) -> go.Figure | dict:
    """One heatmap per head (``{"L.h": pattern[query, key]}``) on one prompt, token labels on both axes
    (``Ġ``/``▁`` shown as ``␣``), queries from ``query_from`` on (e.g. the random words), every key, so "looks
    at the anchor and at word starts" can be seen rather than read."""
    names = list(patterns)
    cols = min(3, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    labels = [f"{i}:{t.replace('Ġ', '␣').replace('▁', '␣').replace('Ċ', '⏎')}"[:14] for i, t in enumerate(tokens)]
    grid = dict(subplot_titles=[f"head {n}" for n in names], horizontal_spacing=0.1,
                vertical_spacing=0.45 / max(rows, 1))
    layout = subplot_layout(rows, cols, **grid)
    data = [dict(type="heatmap", z=np.asarray(patterns[n])[query_from:], x=labels, y=labels[query_from:],
                 colorscale="Blues", zmin=0, zmax=1, showscale=i == 0, colorbar=dict(title={"text": "attention"}),
                 hovertemplate=f"head {n}<br>query %{{y}}<br>key %{{x}}<br>%{{z:.3f}}<extra></extra>",
                 **subplot_axes(i // cols + 1, i % cols + 1, cols)) for i, n in enumerate(names)]
    for k, ax in layout.items():
        if k.startswith("yaxis"):
            ax.update(autorange="reversed", tickfont=dict(size=8))
        elif k.startswith("xaxis"):
            ax.update(tickfont=dict(size=8), tickangle=-60)
    layout.update(title=title, template="plotly_white", height=420 * rows + 120, width=max(560, 460 * cols))
    if as_dict:  # (the JSON-ready dict, for a figure that is only written: probing.plots.figure_dict)
        return figure_dict(data, layout)
    return fast_figure(data, layout, grid=subplot_grid(rows, cols, **grid))
