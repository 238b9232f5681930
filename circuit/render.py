"""The interactive circuit diagram (plotly): layers as columns (embed left, probe right), heads stacked by
index in their layer's column, MLPs below the heads, edge width ∝ |effect|, blue = positive (the edge
carries the clean word index), red = negative; hover shows the numbers and the heads' attention roles.

All nodes are drawn by ONE scatter trace named ``"nodes"`` (``meta`` = the node names, in order), so a
browser test can count drawn nodes against the graph."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import plotly.graph_objects as go

POS_COLOR, NEG_COLOR = "#2166ac", "#b2182b"
KIND_COLORS = {"embed": "#4d4d4d", "probe": "#1a9850", "head": "#fdae61", "mlp": "#abd9e9"}


def layout(G: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """x = layer column (embed at -1, probe one past the probe layer), y = head index (MLPs below)."""
    pos = {}
    heads = [d.get("head", 0) for _, d in G.nodes(data=True) if d.get("kind") == "head"]
    top = max(heads) if heads else 0
    for n, d in G.nodes(data=True):
        kind = d.get("kind")
        if kind == "head":
            pos[n] = (float(d["layer"]), float(top - d["head"]))
        elif kind == "mlp":
            pos[n] = (float(d["layer"]) + 0.35, -1.5)
        elif kind == "embed":
            pos[n] = (-1.0, top / 2)
        else:
            pos[n] = (float(d.get("layer", 0)), top / 2)
    return pos


def _node_hover(n: str, d: dict) -> str:
    lines = [f"<b>{d.get('label', n)}</b> ({d.get('kind')})"]
    if "direct_effect" in d:
        lines.append(f"direct effect on probe: {d['direct_effect']:+.3f}")
    if "role" in d:
        lines.append(f"role: {d['role']}")
    for k, v in d.items():
        if k.startswith("role_"):
            lines.append(f"{k[5:]}: {v:.2f}")
    return "<br>".join(lines)


def render_circuit(G: nx.DiGraph, title: str | None = None) -> go.Figure:
    """Draw ``G``; the title says model, probe layer, metric and prompt count."""
    pos = layout(G)
    g = G.graph
    title = title or (f"Word-index circuit of {g.get('model', '?')}: heads → probe at layer {g.get('probe_layer', '?')}"
                      f"<br><sup>edge effect = {g.get('metric', '?')} (1 = clean, 0 = corrupted), "
                      f"{g.get('n_prompts', '?')} prompt pairs; width ∝ |effect|</sup>")
    fig = go.Figure()
    effects = [abs(d["effect"]) for *_, d in G.edges(data=True)]
    scale = max(effects) if effects else 1.0
    mid_x, mid_y, mid_text, mid_color = [], [], [], []
    shown = {True: False, False: False}
    for u, v, d in sorted(G.edges(data=True), key=lambda e: abs(e[2]["effect"])):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        positive = d["effect"] >= 0
        color = POS_COLOR if positive else NEG_COLOR
        width = 0.5 + 7.5 * abs(d["effect"]) / scale
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", line=dict(color=color, width=width),
                                 opacity=0.75, hoverinfo="skip", legendgroup="pos" if positive else "neg",
                                 name="positive effect" if positive else "negative effect",
                                 showlegend=not shown[positive]))
        shown[positive] = True
        mid_x.append((x0 + x1) / 2)
        mid_y.append((y0 + y1) / 2)
        mid_color.append(color)
        mid_text.append(f"{u} → {v} (via {d.get('via')})<br>effect {d['effect']:+.3f}<br>{d.get('method')}, "
                        f"{d.get('metric')}, {d.get('n_prompts')} prompts")
    if mid_x:
        fig.add_trace(go.Scatter(x=mid_x, y=mid_y, mode="markers", marker=dict(size=7, color=mid_color, opacity=0.3),
                                 hovertext=mid_text, hoverinfo="text", name="edges", showlegend=False))
    names = list(G.nodes)
    data = [G.nodes[n] for n in names]
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text", name="nodes", meta=names,
        text=[d.get("label", n) for n, d in zip(names, data)], textposition="top center",
        marker=dict(size=[26 if d.get("kind") in ("probe", "embed") else 18 for d in data],
                    color=[KIND_COLORS.get(d.get("kind"), "#999") for d in data], line=dict(width=1, color="#333")),
        hovertext=[_node_hover(n, d) for n, d in zip(names, data)], hoverinfo="text", showlegend=False))
    for kind, color in KIND_COLORS.items():  # legend entries for node kinds
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=dict(size=12, color=color),
                                 name=kind if kind != "head" else "attention head"))
    layers = sorted({int(d["layer"]) for _, d in G.nodes(data=True) if d.get("kind") in ("head", "mlp")})
    ticks = [-1.0] + [float(L) for L in layers] + [float(g.get("probe_layer", 0)) + 1]
    labels = ["embed"] + [f"layer {L}" for L in layers] + ["probe"]
    fig.update_layout(title=title, template="plotly_white", hovermode="closest",
                      xaxis=dict(tickvals=ticks, ticktext=labels, showgrid=False, zeroline=False),
                      yaxis=dict(visible=False), height=560, legend=dict(orientation="h", y=-0.08))
    return fig


def save_circuit_figure(fig: go.Figure, directory: str | Path, name: str = "circuit", png: bool = True,
                        svg: bool = True) -> dict[str, list[Path]]:
    """One standalone offline HTML (plotly.js embedded), plus PNG and SVG for papers."""
    from probing.plots import save_figures

    return save_figures({name: fig}, directory, png=png, svg=svg)


def drawn_node_count(fig: go.Figure) -> int:
    return int(np.sum([len(t.x) for t in fig.data if t.name == "nodes"]))
