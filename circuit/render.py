"""The interactive circuit diagram (plotly): layers as columns (embed left, probe right), heads stacked by
index in their layer's column, MLPs below the heads, edge width ∝ |effect|, blue = positive (the edge
carries the clean word index), red = negative; hover shows the numbers and the heads' attention roles.

All nodes are drawn by ONE scatter trace named ``"nodes"`` (``meta`` and ``customdata`` = the node names, in
``G.nodes`` order), so a browser test can count drawn nodes against the graph. Edge hover text sits on
faint markers at the edges' midpoints (trace ``"edges"``); edge lines are grouped into a few traces by sign and
(quantised) width, so large graphs stay light."""

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
    top = int(G.graph["n_heads"]) - 1 if "n_heads" in G.graph else (max(heads) if heads else 0)
    for n, d in G.nodes(data=True):
        kind = d.get("kind")
        if kind == "head":
            pos[n] = (float(d["layer"]), float(top - d["head"]))
        elif kind == "mlp":
            pos[n] = (float(d["layer"]) + 0.35, -1.5)
        elif kind == "embed":
            pos[n] = (-1.0, top / 2)
        else:  # the probe, half a column further right so its label clears the last layer's heads
            pos[n] = (float(d.get("layer", 0)) + 0.5, top / 2)
    return pos


def _node_hover(n: str, d: dict) -> str:
    lines = [f"<b>{d.get('label', n)}</b> ({d.get('kind')})"]
    if "direct_effect" in d:
        lines.append(f"direct effect on probe: {d['direct_effect']:+.4f}")
    if "role" in d:
        lines.append(f"role: {d['role']}")
    for k, v in d.items():
        if k.startswith("role_"):
            lines.append(f"{k[5:]}: {v:.2f}")
    return "<br>".join(lines)


def _edge_hover(u: str, v: str, d: dict) -> str:
    lines = [f"<b>{u} → {v}</b> (via {d.get('via')})", f"effect {d['effect']:+.4f}"]
    for w in ("q", "k", "v"):
        if f"effect_{w}" in d:
            lines.append(f"via {w}: {d[f'effect_{w}']:+.4f}")
    lines.append(f"{d.get('method')} patching, {d.get('metric')}, {d.get('n_prompts')} prompts")
    return "<br>".join(lines)


def default_title(G: nx.DiGraph) -> str:
    g = G.graph
    return (f"Word-index circuit of {g.get('model', '?')}: heads → probe at layer {g.get('probe_layer', '?')}"
            f"<br><sup>edge effect = {g.get('metric', '?')} (1 = clean, 0 = corrupted), "
            f"{g.get('n_prompts', '?')} prompt pairs; width ∝ |effect|, blue positive, red negative</sup>")


def render_circuit(G: nx.DiGraph, title: str | None = None) -> go.Figure:
    """Draw ``G``; the default title states model, probe layer, metric and prompt count.

    Traces: edge lines grouped by sign and width (``"positive effect"`` / ``"negative effect"``, legend entries),
    one invisible-ish marker per edge at its midpoint carrying the edge hover (``"edges"``), ONE trace
    ``"nodes"`` with a marker per node (``meta`` and ``customdata`` = node names, in ``G.nodes`` order), and
    legend-only entries for the node kinds."""
    pos = layout(G)
    g = G.graph
    fig = go.Figure()
    edges = [(u, v, d) for u, v, d in G.edges(data=True) if np.isfinite(d.get("effect", np.nan))]
    scale = max((abs(d["effect"]) for *_, d in edges), default=0.0) or 1.0
    groups: dict[tuple[bool, float], tuple[list, list]] = {}
    mid_x, mid_y, mid_text, mid_color = [], [], [], []
    for u, v, d in sorted(edges, key=lambda e: abs(e[2]["effect"])):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        positive = d["effect"] >= 0
        width = round(4 * (0.5 + 7.5 * abs(d["effect"]) / scale)) / 4  # quantised: a few traces, not one per edge
        xs, ys = groups.setdefault((positive, width), ([], []))
        xs += [x0, x1, None]
        ys += [y0, y1, None]
        mid_x.append((x0 + x1) / 2)
        mid_y.append((y0 + y1) / 2)
        mid_color.append(POS_COLOR if positive else NEG_COLOR)
        mid_text.append(_edge_hover(u, v, d))
    shown = set()
    for (positive, width), (xs, ys) in sorted(groups.items(), key=lambda kv: kv[0][1]):
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=POS_COLOR if positive else NEG_COLOR,
                                                                       width=width),
                                 opacity=0.75, hoverinfo="skip", legendgroup="pos" if positive else "neg",
                                 name="positive effect" if positive else "negative effect",
                                 showlegend=positive not in shown))
        shown.add(positive)
    if mid_x:
        fig.add_trace(go.Scatter(x=mid_x, y=mid_y, mode="markers", name="edges", showlegend=False,
                                 marker=dict(size=9, color=mid_color, opacity=0.15),
                                 hovertext=mid_text, hoverinfo="text"))
    names = list(G.nodes)
    data = [G.nodes[n] for n in names]
    n_heads = sum(d.get("kind") == "head" for d in data)
    text_pos = {"embed": "middle left", "probe": "middle right"}
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text", name="nodes", meta=names,
        customdata=names, text=[d.get("label", n) for n, d in zip(names, data)],
        textposition=[text_pos.get(d.get("kind"), "top center") for d in data],
        textfont=dict(size=12 if n_heads <= 24 else 9),
        marker=dict(size=[26 if d.get("kind") in ("probe", "embed") else 18 for d in data],
                    color=[KIND_COLORS.get(d.get("kind"), "#999") for d in data], line=dict(width=1, color="#333")),
        hovertext=[_node_hover(n, d) for n, d in zip(names, data)], hoverinfo="text", showlegend=False))
    kinds = {d.get("kind") for d in data}
    for kind, color in KIND_COLORS.items():  # legend entries for the node kinds present
        if kind in kinds:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=dict(size=12, color=color),
                                     name={"head": "attention head", "mlp": "MLP"}.get(kind, kind)))
    layers = sorted({int(d["layer"]) for d in data if d.get("kind") in ("head", "mlp")})
    probe_x = max((x for n, (x, _) in pos.items() if G.nodes[n].get("kind") == "probe"),
                  default=float(g.get("probe_layer", max(layers, default=0))) + 1.5)
    ticks = [-1.0] + [float(L) for L in layers] + [probe_x]
    labels = ["embed"] + [f"L{L}" if len(layers) > 8 else f"layer {L}" for L in layers] + ["probe"]
    n_cols = probe_x + 2  # embed column to probe column
    fig.update_layout(title=title or default_title(G), template="plotly_white", hovermode="closest",
                      width=int(max(900, 62 * n_cols + 260)),
                      xaxis=dict(tickvals=ticks, ticktext=labels, showgrid=False, zeroline=False,
                                 range=[-2.4, probe_x + 1.6]),
                      yaxis=dict(visible=False), height=max(460, 100 + 55 * (max(
                          (d.get("head", 0) for d in data if d.get("kind") == "head"), default=0) + 3)),
                      legend=dict(orientation="h", y=-0.08))
    return fig


def save_circuit_figure(fig: go.Figure | dict, directory: str | Path, name: str = "circuit", png: bool = True,
                        svg: bool = True) -> dict[str, list[Path]]:
    """``{name}.html``: ONE standalone page with the full plotly.js embedded (opens offline, no CDN), plus
    ``{name}.png`` and ``{name}.svg`` via kaleido (and ``{name}.plotly.json`` for reports). Without kaleido or
    Chromium the static images are skipped with a warning and the HTML is still written
    (:func:`probing.plots.save_figures`). Returns ``{name: [paths written]}``."""
    from wordpos.probing.plots import save_figures

    return save_figures({name: fig}, directory, png=png, svg=svg)


def drawn_node_count(fig: go.Figure) -> int:
    """Points in the ``"nodes"`` trace (what a browser should draw)."""
    return int(np.sum([len(t.x) for t in fig.data if t.name == "nodes"]))
