"""The edge-circuit diagram (plotly, one offline HTML): only the chosen circuit's heads and MLPs, laid out by
layer (``input`` left, each layer a column with heads stacked by index and the MLP below, ``probe`` right).

* An edge goes from its writer to the node its reader belongs to; the reader kind is the colour (q, k, v, MLP
  input, probe) and each kind arrives at its own port of a head (q above, k level, v below), so q/k/v read at a
  glance. Width ∝ |score|; solid = the edge carries the clean reading (score < 0: removing it lowers the
  metric, :class:`~patching.edge_graph.EdgeScores`' sign), dotted = it works against it.
* A slider (plotly ``sliders``/``steps``, no server) shows the top 10/20/50/100/200 edges by |score| (and the
  whole circuit when it has at most ``max_all`` edges); the default step draws at most ``default_max`` (200).
* Per step there is one line trace per reader kind, one marker trace at the edge midpoints named
  ``"edges (top K)"`` (``meta`` = the edge names, hover = writer → reader, score) and one node trace
  ``"nodes (top K)"`` (``meta`` = node names); only the active step's traces are visible, so a browser test can
  count what is drawn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from wordpos.patching.edge_graph import EdgeGraph
from wordpos.probing.errors import ConfigError
from wordpos.probing.plots import fast_figure, figure_dict

STEPS = (10, 20, 50, 100, 200)
KIND_COLORS = {"q": "#1b9e77", "k": "#d95f02", "v": "#7570b3", "mlp": "#e7298a", "probe": "#444444"}
KIND_LABELS = {"q": "into a head's query (q)", "k": "into a head's key (k)", "v": "into a head's value (v)",
               "mlp": "into an MLP", "probe": "into the probe"}
NODE_COLORS = {"input": "#bdbdbd", "head": "#fdae61", "mlp": "#abd9e9", "probe": "#a6d96a"}
PORT = {"q": 0.2, "k": 0.0, "v": -0.2}
_HEAD_RE = re.compile(r"^a(\d+)\.h(\d+)$")


def _node_pos(graph: EdgeGraph, name: str) -> tuple[float, float]:
    top = graph.n_heads - 1
    if name == "input":
        return -1.0, top / 2
    if name == "probe":
        return graph.probe_layer + 1.0, top / 2
    m = _HEAD_RE.match(name)
    if m:
        return float(m.group(1)), float(top - int(m.group(2)))
    return float(name[1:]) + 0.45, -1.5  # MLP


def _reader_target(graph: EdgeGraph, reader: str, nodes: set[str]) -> str:
    """The drawn node a reader belongs to (GQA k/v: the first query head of its group in the circuit)."""
    kind = graph.reader_kind(reader)
    if kind == "probe":
        return "probe"
    if kind == "mlp":
        return reader
    heads = graph.reader_heads(reader)
    return next((h for h in heads if h in nodes), heads[0])


def _edge_xy(graph: EdgeGraph, w: str, r: str, nodes: set[str]) -> tuple[tuple[float, float], tuple[float, float]]:
    kind = graph.reader_kind(r)
    x0, y0 = _node_pos(graph, w)
    x1, y1 = _node_pos(graph, _reader_target(graph, r, nodes))
    if kind in PORT:
        x1, y1 = x1 - 0.07, y1 + PORT[kind]
    return (x0 + 0.07, y0), (x1, y1)


def _curves(ends: np.ndarray, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic Béziers from ``(x0, y0)`` to ``(x1, y1)`` (``ends``: ``[edge, 4]``), each bowed upwards by 0.12 per
    layer crossed, so an edge between nodes of one row does not run through the nodes between them: ``(xs, ys)``,
    ``[edge, n]`` each, rounded to 4 decimals."""
    x0, y0, x1, y1 = (ends[:, i:i + 1] for i in range(4))
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1) + 0.12 * np.abs(x1 - x0)
    t = np.linspace(0.0, 1.0, n)
    a, b, c = (1 - t) ** 2, 2 * (1 - t) * t, t ** 2
    return np.round(a * x0 + b * cx + c * x1, 4), np.round(a * y0 + b * cy + c * y1, 4)


def step_sizes(n_edges: int, steps: Sequence[int] = STEPS, max_all: int = 400) -> list[int]:
    """The slider's sizes: each of ``steps`` below ``n_edges``, then ``n_edges`` itself when it is at most
    ``max(max(steps), max_all)``."""
    ks = sorted({int(k) for k in steps if 0 < k < n_edges})
    if n_edges <= max(max(steps), max_all):
        ks.append(n_edges)
    return ks or [n_edges]


def render_edge_circuit(graph: EdgeGraph, edges: Sequence[tuple[str, float]], *, title: str | None = None,
                        steps: Sequence[int] = STEPS, default_max: int = 200, max_all: int = 400,
                        info: dict[str, Any] | None = None, validate: bool = False, as_dict: bool = False
                        ) -> go.Figure | dict[str, Any]:
    """Draw the circuit ``edges`` (``[("w->r", score)]``) of ``graph`` with the top-K slider (module docstring).
    ``info`` adds lines to the title (e.g. faithfulness, ablation). Built from plain dicts without plotly's
    per-property validation (:func:`~wordpos.probing.plots.fast_figure`; ``validate=True`` validates).
    ``as_dict``: the figure's JSON-ready dict instead (:func:`~wordpos.probing.plots.figure_dict`, the same as the
    Figure's ``to_dict()``), for a figure that is only written (:func:`save_edge_circuit_figure` takes either)."""
    if not edges:
        raise ConfigError("the circuit has no edges to draw; select one with circuit.select_circuit.")
    parsed = []
    for name, score in edges:
        w, r = name.split("->", 1)
        graph.edge(name)  # raises on names that are not edges of this graph
        parsed.append((name, w, r, float(score)))
    parsed.sort(key=lambda e: -abs(e[3]))
    n = len(parsed)
    ks = step_sizes(n, steps, max_all)
    default = max([k for k in ks if k <= default_max] or [ks[0]])
    scale = max(abs(e[3]) for e in parsed) or 1.0
    data: list[dict[str, Any]] = []  # plain trace dicts, made a Figure once at the end (plots.fast_figure)
    visible_of: list[int] = []  # the step each trace belongs to (-1: always)
    for si, k in enumerate(ks):
        sub = parsed[:k]
        nodes = {w for _, w, _, _ in sub} | {"probe"}
        nodes |= {_reader_target(graph, r, {w for _, w, _, _ in sub}) for _, _, r, _ in sub}
        # every edge's curve at once (numpy; one trace per reader kind, sign and width): coordinates as float arrays,
        # which plotly copies and serialises as one typed array each (lists of floats cost a Python object per point
        # in every copy the figure makes), with NaN (a gap in plotly.js) between edges where a list had None
        keys, ends = [], []
        mtext, mcolor, mnames = [], [], []
        for rank, (name, w, r, s) in reversed(list(enumerate(sub, 1))):  # strongest drawn last (on top)
            kind = graph.reader_kind(r)
            ends.append(_edge_xy(graph, w, r, nodes))
            keys.append((kind, s < 0, 0.8 + 1.4 * round(3 * abs(s) / scale)))  # four widths: few traces per step
            mcolor.append(KIND_COLORS[kind])
            mnames.append(name)
            heads = graph.reader_heads(r)
            extra = f" (key/value head of {', '.join(heads)})" if kind in ("k", "v") and len(heads) > 1 else ""
            mtext.append(f"<b>{w} → {r}</b>{extra}<br>reader: {KIND_LABELS[kind]}<br>score {s:+.4g} "
                         f"(rank {rank} of {n})")
        cx, cy = _curves(np.asarray(ends, dtype=np.float64).reshape(-1, 4))
        groups: dict[tuple[str, bool, float], list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        gap = np.full((len(keys), 1), np.nan)
        gx, gy = (np.concatenate([c, gap], axis=1) for c in (cx, cy))  # each edge's curve, then its gap
        for (kind, carries, width), idx in sorted(groups.items(), key=lambda kv: kv[0][2]):
            xs, ys = gx[idx].ravel(), gy[idx].ravel()
            data.append(dict(type="scatter", x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                             line=dict(color=KIND_COLORS[kind], width=width, dash="solid" if carries else "dot"),
                             opacity=0.8, name=f"{kind} edges (top {k})", visible=k == default))
            visible_of.append(si)
        mid = cx.shape[1] // 2
        data.append(dict(type="scatter", x=cx[:, mid].copy(), y=cy[:, mid].copy(), mode="markers",
                         name=f"edges (top {k})", meta=mnames,
                         customdata=mnames, marker=dict(size=8, color=mcolor, opacity=0.25), hovertext=mtext,
                         hoverinfo="text", showlegend=False, visible=k == default))
        visible_of.append(si)
        out_sum: dict[str, float] = {}
        ins: dict[str, set[str]] = {}
        for _, w, r, s in sub:
            out_sum[w] = out_sum.get(w, 0.0) + abs(s)
            kind = graph.reader_kind(r)
            if kind in PORT:
                for h in graph.reader_heads(r):
                    ins.setdefault(h, set()).add(kind)
            elif kind == "mlp":
                ins.setdefault(r, set()).add("in")
        names = sorted(nodes, key=lambda v: (_node_pos(graph, v)[0], -_node_pos(graph, v)[1]))
        kinds = ["input" if v == "input" else "probe" if v == "probe" else "head" if _HEAD_RE.match(v) else "mlp"
                 for v in names]
        labels = []
        for v, kd in zip(names, kinds):
            if kd == "head":
                L, h = _HEAD_RE.match(v).groups()
                q = "".join(x for x in "qkv" if x in ins.get(v, set()))
                labels.append(f"{L}.{h}" + (f"<sub>{q}</sub>" if q else ""))
            else:
                labels.append({"input": "input", "probe": f"probe (L{graph.probe_layer})"}.get(kd, f"MLP {v[1:]}"))
        hover = [f"<b>{v}</b> ({kd})<br>inputs used: {', '.join(sorted(ins.get(v, []))) or '—'}<br>"
                 f"Σ|score| out: {out_sum.get(v, 0.0):.4g}" for v, kd in zip(names, kinds)]
        data.append(dict(
            type="scatter",
            x=[_node_pos(graph, v)[0] for v in names], y=[_node_pos(graph, v)[1] for v in names],
            mode="markers+text", name=f"nodes (top {k})", meta=names, customdata=names, text=labels,
            textposition=["middle left" if kd == "input" else "middle right" if kd == "probe" else "top center"
                          for kd in kinds],
            textfont=dict(size=11 if graph.n_heads <= 12 else 9),
            marker=dict(size=[24 if kd in ("input", "probe") else 16 for kd in kinds],
                        color=[NODE_COLORS[kd] for kd in kinds], line=dict(width=1, color="#333")),
            hovertext=hover, hoverinfo="text", showlegend=False, visible=k == default))
        visible_of.append(si)
    for kind, color in KIND_COLORS.items():  # legend: reader kinds, always visible
        data.append(dict(type="scatter", x=[None], y=[None], mode="lines", line=dict(color=color, width=3),
                         name=KIND_LABELS[kind]))
        visible_of.append(-1)
    data.append(dict(type="scatter", x=[None], y=[None], mode="lines", line=dict(color="#888", width=2, dash="dot"),
                     name="dotted: works against the clean reading"))
    visible_of.append(-1)
    sliders = [dict(active=ks.index(default), currentvalue=dict(prefix="edges shown: "), pad=dict(t=30), y=0,
                    yanchor="top",
                    steps=[dict(method="update", label=f"top {k}" if k < n else f"all {n}",
                                args=[{"visible": [s == si or s == -1 for s in visible_of]}])
                           for si, k in enumerate(ks)])]
    layers = list(range(graph.probe_layer + 1))
    ticks = [-1.0] + [float(L) for L in layers] + [graph.probe_layer + 1.0]
    tick_text = ["input"] + [f"L{L}" for L in layers] + ["probe"]
    head = title or "Edge circuit"
    sub = f"{n} edges; slider: top-K by |score|; colour = reader (q/k/v/MLP/probe), width ∝ |score|"
    if info:
        sub = " · ".join(f"{k} {v}" for k, v in info.items()) + "<br>" + sub
    layout = dict(title=f"{head}<br><sup>{sub}</sup>", template="plotly_white", hovermode="closest",
                  sliders=sliders, width=int(max(900, 70 * (graph.probe_layer + 3) + 300)),
                  height=int(max(520, 60 * (graph.n_heads + 3) + 160)),
                  xaxis=dict(tickvals=ticks, ticktext=tick_text, showgrid=False, zeroline=False,
                             range=[-1.8, graph.probe_layer + 2.2]),
                  yaxis=dict(visible=False, range=[-2.3, graph.n_heads + 0.2]),
                  legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"), margin=dict(t=150, b=110))
    return figure_dict(data, layout) if as_dict else fast_figure(data, layout, validate=validate)


def render_circuit_edges(circuit: Any, title: str | None = None, **kw: Any) -> go.Figure | dict[str, Any]:
    """:func:`render_edge_circuit` for an :class:`~circuit.edge_circuit.EdgeCircuit`, with its numbers in the
    title."""
    info = {"f =": f"{circuit.faithfulness:.3f} [{circuit.ci[0]:.3f}, {circuit.ci[1]:.3f}]",
            "ablation:": circuit.ablation, "scores:": circuit.method,
            "of graph:": f"{circuit.percent_of_graph:.2f}%"}
    return render_edge_circuit(circuit.edge_graph(), list(zip(circuit.edges, circuit.edge_scores)), title=title,
                               info=info, **kw)


def drawn_edge_count(fig: go.Figure) -> int:
    """Edges drawn in the figure's default (visible) step."""
    return int(np.sum([len(t.meta) for t in fig.data if (t.name or "").startswith("edges (top")
                       and t.visible is not False]))


def save_edge_circuit_figure(fig: go.Figure | dict[str, Any], directory: str | Path, name: str = "circuit",
                             png: bool = True) -> dict[str, list[Path]]:
    """``{name}.html`` (offline, plotly.js embedded) + ``{name}.plotly.json`` + ``{name}.png`` when kaleido finds
    Chromium (:func:`circuit.render.save_circuit_figure`)."""
    from wordpos.circuit.render import save_circuit_figure

    return save_circuit_figure(fig, directory, name=name, png=png, svg=False)


__all__ = ["KIND_COLORS", "STEPS", "drawn_edge_count", "render_circuit_edges", "render_edge_circuit",
           "save_edge_circuit_figure", "step_sizes"]
