"""Probe figures (plotly): the key plot, accuracy against layer, the confusion matrix; and saving any
figure as standalone offline HTML plus PNG.

Colours: word index ``k`` always has colour ``INDEX_COLORS[k]``, in every figure, with legends in
numerical order (the original post's legend was not, "sigh").
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from wordpos.probing.errors import ConfigError

log = logging.getLogger(__name__)

INDEX_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]


def fast_figure(data: Sequence[dict[str, Any]], layout: dict[str, Any], *, validate: bool = False,
                grid: tuple[Any, str] | None = None) -> go.Figure:
    """A Figure from plain trace and layout dicts, without plotly's per-property validation, which is most of the
    time to build a figure of many traces (the edge-circuit diagram: 0.19 s → 0.05 s). It does what validation
    would change in wordpos' own figures: a named template is resolved, a string title becomes
    ``{"text": title}`` and a named colorscale is written out. ``validate=True`` builds the validated figure; the
    tests check the two serialise alike. ``grid`` (:func:`subplot_grid`) is a subplot grid's reference, so that
    ``row=``/``col=`` edits work as on a ``make_subplots`` figure."""
    if validate:
        fig = go.Figure(data=list(data), layout=layout)
        if grid is not None:
            fig._grid_ref, fig._grid_str = grid
        return fig
    data, layout = _as_validated(data, layout)
    fig = go.Figure(data=data, layout=layout, _validate=False)
    if grid is not None:
        fig._grid_ref, fig._grid_str = grid  # what make_subplots sets (plotly keeps no public setter)
    fig._validate = fig.layout._validate = True  # later edits by the caller are validated as usual
    for trace in fig.data:
        trace._validate = True
    return fig


def _as_validated(data: Sequence[dict[str, Any]], layout: dict[str, Any]
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What plotly's validation would change in wordpos' own plain figure dicts (:func:`fast_figure`,
    :func:`figure_dict`): a named template resolved, a string title made ``{"text": title}``, a named colorscale
    written out. The caller's dicts are not changed (a new one wherever something changes)."""
    import plotly.io as pio

    layout = dict(layout)
    if isinstance(layout.get("template"), str):
        layout["template"] = pio.templates[layout["template"]]
    if isinstance(layout.get("title"), str):
        layout["title"] = {"text": layout["title"]}
    return [_named_colorscales(t) for t in data], layout


@functools.lru_cache(maxsize=64)
def _colorscale(name: str) -> str:
    return json.dumps(go.Heatmap(colorscale=name).to_plotly_json()["colorscale"])  # validated once per name


_TYPED = {"int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4", "uint32": "u4",
          "float32": "f4", "float64": "f8"}  # plotly.js' typed-array names (_plotly_utils.utils)
_UNTYPED_KEYS = ("geojson", "layer", "layers", "range")  # values plotly never turns into typed arrays


def _typed_array(v: np.ndarray) -> Any:
    """A numpy array as plotly's ``to_dict`` writes it (``_plotly_utils.utils.to_typed_array_spec``): base64 of its
    bytes with plotly.js' dtype name; 64-bit integers narrowed to the smallest type that holds them, or kept."""
    if v.size == 0:
        return v.copy()
    if v.dtype.kind in "iu" and v.dtype.itemsize == 8:
        lo, hi = int(v.min()), int(v.max())
        kinds = ("int8", "int16", "int32") if v.dtype.kind == "i" else ("uint8", "uint16", "uint32")
        fit = next((t for t in kinds if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max), None)
        if fit is None:
            return v.copy()
        v = v.astype(fit)
    name = _TYPED.get(str(v.dtype))
    if name is None:
        return v.copy()
    spec = {"dtype": name, "bdata": base64.b64encode(np.ascontiguousarray(v)).decode("ascii")}
    if v.ndim > 1:
        spec["shape"] = str(v.shape)[1:-1]
    return spec


def _plain(obj: Any) -> Any:
    """A copy of nested dicts and lists with every numpy array that is a dict's value made a typed array
    (``plotly.basedatatypes.BaseFigure.to_dict``'s deep copy and ``convert_to_base64``, for plain dicts)."""
    if isinstance(obj, dict):
        return {k: (_plain_value(v) if k not in _UNTYPED_KEYS else copy.deepcopy(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj] if isinstance(obj, list) else tuple(_plain(v) for v in obj)
    return copy.deepcopy(obj)


def _plain_value(v: Any) -> Any:
    return _typed_array(v) if isinstance(v, np.ndarray) else _plain(v)


def figure_dict(data: Sequence[dict[str, Any]], layout: dict[str, Any]) -> dict[str, Any]:
    """``fast_figure(data, layout).to_dict()`` without making the Figure: the JSON-ready dict :func:`save_figures`
    writes (tested equal to plotly's). A Figure's construction and ``to_dict`` deep-copy everything and look every
    array up through narwhals; for a figure only written to disk (``wordpos run``'s edge diagram) that was most of
    the time it took."""
    data, layout = _as_validated([{k: v for k, v in t.items() if v is not None} for t in data],
                                 {k: v for k, v in layout.items() if v is not None})  # (plotly drops a None property)
    if hasattr(layout.get("template"), "to_plotly_json"):
        layout["template"] = layout["template"].to_plotly_json()
    # in plotly's key order too (a trace's and the layout's own keys sorted, the trace's type last): for a figure
    # without numbered subplot axes the files are written byte for byte as from the Figure
    traces = [_plain(t) for t in data]
    traces = [{**{k: t[k] for k in sorted(t) if k != "type"}, **({"type": t["type"]} if "type" in t else {})}
              for t in traces]
    layout = _plain(layout)
    return {"data": traces, "layout": {k: layout[k] for k in sorted(layout)}}


def _named_colorscales(trace: dict[str, Any]) -> dict[str, Any]:
    """A named colorscale ("RdBu") written out as validation writes it (plotly.py's scale, not plotly.js')."""
    if isinstance(trace.get("colorscale"), str):
        trace = {**trace, "colorscale": json.loads(_colorscale(trace["colorscale"]))}
    marker = trace.get("marker")
    if isinstance(marker, dict) and isinstance(marker.get("colorscale"), str):
        trace = {**trace, "marker": {**marker, "colorscale": json.loads(_colorscale(marker["colorscale"]))}}
    return trace


def index_color(k: int) -> str:
    return INDEX_COLORS[int(k) % len(INDEX_COLORS)]


_GRID_KWARGS = {"shared_xaxes", "vertical_spacing", "horizontal_spacing", "subplot_titles"}


def _plain_grid(rows: int, cols: int, **kwargs: Any) -> bool:
    """Whether :func:`_grid_layout` computes this grid: only its arguments, ``shared_xaxes`` True or False, and
    sizes and spacings ``make_subplots`` accepts (anything else goes to ``make_subplots``, which refuses what it
    cannot draw with its own error)."""
    if not set(kwargs) <= _GRID_KWARGS or kwargs.get("shared_xaxes", False) not in (True, False):
        return False
    if rows < 1 or cols < 1:
        return False
    for n, key in ((cols, "horizontal_spacing"), (rows, "vertical_spacing")):
        sp = kwargs.get(key)
        if sp is not None and not (0 <= sp <= 1 and (n <= 1 or sp <= 1.0 / float(n - 1))):
            return False
    return True


def _grid_layout(rows: int, cols: int, shared_xaxes: bool = False, vertical_spacing: float | None = None,
                 horizontal_spacing: float | None = None, subplot_titles: Sequence[str] | None = None
                 ) -> dict[str, Any]:
    """``make_subplots(rows, cols, ...).to_dict()["layout"]`` (without its template) for a plain grid of xy plots
    from the top-left cell, computed as plotly's ``_subplots.make_subplots`` computes it (the same float operations
    in the same order; tested equal), without building and validating a Figure: a cold ``make_subplots`` took
    0.05-0.1 s here, a warm one 15 ms, and the probe and attention stages each drew one grid per run."""
    hs = 0.2 / cols if horizontal_spacing is None else horizontal_spacing
    vs = (0.5 if subplot_titles is not None else 0.3) / rows if vertical_spacing is None else vertical_spacing
    widths = [(1.0 - hs * (cols - 1)) / cols] * cols
    heights = [(1.0 - vs * (rows - 1)) / rows] * rows
    grid = [[(sum(widths[:c]) + c * hs, sum(heights[:r]) + r * vs) for c in range(cols)]
            for r in range(rows)[::-1]]  # start_cell "top-left": the first row of cells is the top one
    layout: dict[str, Any] = {}
    domains: list[list[float]] = []
    for r in range(rows):
        for c in range(cols):
            x_s, y_s = grid[r][c]
            x_e, y_e = grid[r][c][0] + widths[c], grid[r][c][1] + heights[-1 - r]
            y_s = 0.0 if -0.01 < y_s < 0.0 else 1.0 if 1.0 < y_s < 1.01 else y_s
            y_e = 0.0 if -0.01 < y_e < 0.0 else 1.0 if 1.0 < y_e < 1.01 else y_e
            domains += [[x_s, x_e], [y_s, y_e]]
            k = r * cols + c + 1
            n = k if k > 1 else ""
            layout[f"xaxis{n}"] = {"anchor": f"y{n}", "domain": [max(0.0, x_s), min(1.0, x_e)]}
            layout[f"yaxis{n}"] = {"anchor": f"x{n}", "domain": [max(0.0, y_s), min(1.0, y_e)]}
    if shared_xaxes:  # every column's x axes match its bottom one, whose tick labels alone are shown
        for c in range(cols):
            bottom = (rows - 1) * cols + c + 1
            for r in range(rows - 1):
                k = r * cols + c + 1
                layout[f"xaxis{k if k > 1 else ''}"].update(matches=f"x{bottom if bottom > 1 else ''}",
                                                             showticklabels=False)
    titles = [{"font": {"size": 16}, "showarrow": False, "text": t, "x": sum(domains[2 * i]) / 2.0,
               "xanchor": "center", "xref": "paper", "y": domains[2 * i + 1][1], "yanchor": "bottom",
               "yref": "paper"} for i, t in enumerate(subplot_titles or []) if t and i < len(domains) // 2]
    if titles:
        layout["annotations"] = titles
    return layout


@functools.lru_cache(maxsize=16)
def _subplot_grid(rows: int, cols: int, kwargs: str) -> tuple[str, Any, str]:
    fig = make_subplots(rows=rows, cols=cols, **json.loads(kwargs))
    layout = fig.to_dict()["layout"]
    layout.pop("template", None)
    return json.dumps(layout), fig._grid_ref, fig._grid_str


def subplot_layout(rows: int, cols: int, **kwargs: Any) -> dict[str, Any]:
    """``make_subplots(rows, cols, **kwargs)``'s layout (axes, domains, subplot titles) as a plain dict for
    :func:`fast_figure`, computed once per grid: a trace in row ``r``, column ``c`` names its axes with
    :func:`subplot_axes`; ``fast_figure(..., grid=subplot_grid(rows, cols, **kwargs))`` makes the figure take
    ``row=``/``col=`` edits as a ``make_subplots`` figure does."""
    if _plain_grid(int(rows), int(cols), **kwargs):  # computed as plotly does, without making a figure
        return _grid_layout(int(rows), int(cols), **kwargs)
    return json.loads(_subplot_grid(int(rows), int(cols), json.dumps(kwargs, sort_keys=True))[0])


def subplot_grid(rows: int, cols: int, **kwargs: Any) -> tuple[Any, str]:
    """``make_subplots``' grid reference for :func:`fast_figure` (plotly's own, from the same cached call)."""
    _, ref, text = _subplot_grid(int(rows), int(cols), json.dumps(kwargs, sort_keys=True))
    return copy.deepcopy(ref), text


def subplot_axes(row: int, col: int, cols: int) -> dict[str, str]:
    """The ``xaxis``/``yaxis`` a trace in (1-based) ``row``, ``col`` of a ``cols``-wide grid names."""
    k = (row - 1) * cols + col
    return {"xaxis": f"x{k if k > 1 else ''}", "yaxis": f"y{k if k > 1 else ''}"}


HLINE_POSITIONS = ("top left", "top right", "bottom left", "bottom right")


def hline(layout: dict[str, Any], y: float, line: dict[str, Any], text: str | None = None,
          position: str = "top right") -> None:
    """What ``Figure.add_hline(y, line=..., annotation_text=..., annotation_position=...)`` adds to a one-plot
    figure, added to a plain ``layout`` dict: a full-width line and its label at that corner."""
    layout.setdefault("shapes", []).append({"type": "line", "line": dict(line), "x0": 0, "x1": 1,
                                            "xref": "x domain", "y0": y, "y1": y, "yref": "y"})
    if text is not None:
        if position not in HLINE_POSITIONS:
            raise ConfigError(f"hline labels go at one of {HLINE_POSITIONS}, got {position!r}.")
        vert, horiz = position.split()
        layout.setdefault("annotations", []).append({
            "showarrow": False, "text": text, "x": 1 if horiz == "right" else 0, "xanchor": horiz,
            "xref": "x domain", "y": y, "yanchor": "top" if vert == "bottom" else "bottom", "yref": "y"})


def key_plot(abs_pos: Any, y_true: Any, y_pred: Any, title: str = "Probe predictions by absolute position", *,
             as_dict: bool = False) -> go.Figure | dict[str, Any]:
    """One row per true word index; x = absolute position; stacked bars = fraction of the samples at
    that (index, position) predicted as each index. Bars above a position that holds several indices
    show the probe telling them apart. ``as_dict``: the figure's JSON-ready dict (:func:`figure_dict`), for a
    figure that is only written."""
    pos, yt, yp = (np.asarray(a).reshape(-1) for a in (abs_pos, y_true, y_pred))
    classes = sorted(set(yt.tolist()) | set(yp.tolist()))
    rows = sorted(set(yt.tolist()))
    grid = dict(shared_xaxes=True, vertical_spacing=0.02)
    layout = subplot_layout(len(rows), 1, **grid)
    data = []
    for r, k in enumerate(rows, start=1):
        sel = yt == k
        xs = sorted(set(pos[sel].tolist()))
        n_at = np.array([np.sum(pos[sel] == x) for x in xs])
        for c in classes:
            frac = np.array([np.sum((pos[sel] == x) & (yp[sel] == c)) for x in xs]) / np.maximum(n_at, 1)
            data.append(dict(
                type="bar", x=xs, y=frac, name=f"predicted {c}", legendgroup=str(c), showlegend=(r == 1),
                marker=dict(color=index_color(c)), customdata=np.stack([n_at, frac * n_at], -1),
                hovertemplate=f"true {k}, predicted {c}<br>position %{{x}}<br>%{{y:.1%}} "
                              "(%{customdata[1]:.0f} of %{customdata[0]})<extra></extra>",
                **subplot_axes(r, 1, 1)))
        layout[f"yaxis{r if r > 1 else ''}"].update(range=[0, 1], tickformat=".0%", nticks=3,
                                                    title={"text": f"true {k}"})
    layout[f"xaxis{len(rows) if len(rows) > 1 else ''}"]["title"] = {"text": "absolute token position"}
    layout.update(barmode="stack", title=title, height=110 * len(rows) + 160, bargap=0.1,
                  legend=dict(traceorder="normal", title={"text": "predicted index"}), template="plotly_white")
    if as_dict:
        return figure_dict(data, layout)
    return fast_figure(data, layout, grid=subplot_grid(len(rows), 1, **grid))


def layer_curve(per_layer: dict[int, float], baseline: float, title: str = "Probe accuracy by layer",
                shuffled: float | None = None, per_layer_val: dict[int, float] | None = None, *,
                as_dict: bool = False) -> go.Figure | dict[str, Any]:
    """Held-out-word accuracy at each layer, with the position-only baseline (and shuffled control).
    ``as_dict``: the figure's JSON-ready dict (:func:`figure_dict`)."""
    layers = sorted(int(k) for k in per_layer)
    data = [dict(type="scatter", x=layers, y=[per_layer[L] for L in layers], mode="lines+markers",
                 name="probe (held-out words)", line=dict(color="#1f77b4", width=3))]
    if per_layer_val:
        data.append(dict(type="scatter", x=layers, y=[per_layer_val[L] for L in layers], mode="lines",
                         name="probe (validation, train words)", line=dict(color="#1f77b4", dash="dot")))
    layout: dict[str, Any] = {}
    hline(layout, baseline, dict(color="#d62728", dash="dash"), f"position-only baseline {baseline:.1%}",
          "bottom right")
    if shuffled is not None:
        hline(layout, shuffled, dict(color="#7f7f7f", dash="dot"), f"shuffled labels {shuffled:.1%}", "top right")
    layout.update(title=title, xaxis=dict(title={"text": "layer (residual stream after block)"}),
                  yaxis=dict(range=[0, 1], tickformat=".0%", title={"text": "accuracy"}), template="plotly_white")
    return figure_dict(data, layout) if as_dict else fast_figure(data, layout)


def confusion_heatmap(confusion: Sequence[Sequence[int]], title: str = "Confusion (held-out words)", *,
                      as_dict: bool = False) -> go.Figure | dict[str, Any]:
    """Row-normalised confusion of word indices, counts as text. ``as_dict``: the JSON-ready dict
    (:func:`figure_dict`)."""
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    labels = [str(i) for i in range(cm.shape[0])]
    data = [dict(type="heatmap", z=norm, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
                 text=cm.astype(int), texttemplate="%{text}",
                 hovertemplate="true %{y}, predicted %{x}: %{z:.1%}<extra></extra>")]
    layout = dict(title=title, xaxis=dict(title={"text": "predicted word index"}),
                  yaxis=dict(title={"text": "true word index"}, autorange="reversed"), template="plotly_white")
    return figure_dict(data, layout) if as_dict else fast_figure(data, layout)


class ImageQueue:
    """Static images that :func:`save_figures` was asked for inside :func:`deferred_images`: kaleido starts a
    headless Chromium for every call (about 4 s on 2 CPU cores, then ~0.3 s per figure), so a run collects its
    PNGs and writes them in one call at the end (or not at all when ``enabled`` is False)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.jobs: list[tuple[go.Figure, Path, str, float]] = []

    def flush(self) -> list[Path]:
        """Write every queued image, one kaleido call per format; returns the paths written."""
        jobs, self.jobs = self.jobs, []
        written: list[Path] = []
        for fmt in sorted({j[2] for j in jobs}):
            items = [(fig, path, scale) for fig, path, f, scale in jobs if f == fmt]
            written += _write_images(items, fmt)
        return written


_QUEUE: ImageQueue | None = None


@contextlib.contextmanager
def deferred_images(enabled: bool = True) -> Iterator[ImageQueue]:
    """Inside the block :func:`save_figures` writes HTML and JSON at once and queues its static images; call
    ``queue.flush()`` to write them all in one kaleido session (``enabled=False``: no static images)."""
    global _QUEUE
    prev, _QUEUE = _QUEUE, ImageQueue(enabled)
    try:
        yield _QUEUE
    finally:
        _QUEUE = prev


def _write_images(items: list[tuple[go.Figure, Path, float]], fmt: str) -> list[Path]:
    """Write ``(figure, path, scale)`` items as ``fmt`` in one kaleido call, atomically; on failure (kaleido
    without Chromium, ...) warn once and write none."""
    if not items:
        return []
    try:
        import plotly.io as pio

        tmp_paths = [p.with_name(f".{p.name}.tmp.{fmt}") for _, p, _ in items]
        figs = [f for f, _, _ in items]
        # kaleido's batch writer ignores the layout's size (700x500 for every figure): pass it explicitly
        pio.write_images(figs, [str(p) for p in tmp_paths], format=fmt, scale=[s for _, _, s in items],
                         width=[f.layout.width or 700 for f in figs], height=[f.layout.height or 500 for f in figs])
        for tmp, (_, p, _) in zip(tmp_paths, items):
            tmp.replace(p)
        return [p for _, p, _ in items]
    except Exception as e:  # kaleido missing Chrome, etc.
        warnings.warn(f"{fmt.upper()} export skipped ({type(e).__name__}: {str(e)[:200]}). The HTML files are "
                      "written; for static images install Chromium (`apt-get install chromium`) so kaleido "
                      "can render.", stacklevel=3)
        return []


_JS_MARKER = "wordpos-inline-plotly.js"


@functools.lru_cache(maxsize=1)
def _plotlyjs_bytes() -> bytes:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode("utf-8")


def _write_offline_html(fig_dict: dict[str, Any], path: Path) -> None:
    """``plotly.io.write_html(fig, include_plotlyjs=True, full_html=True)``, byte for byte, without formatting the
    4.8 MB plotly.js into a new string for every figure (most of a small figure's write time): plotly writes the
    page with a placeholder script URL, and the bundle's bytes, read once per process, go in its place."""
    import plotly.io as pio

    html = pio.to_html(fig_dict, include_plotlyjs=_JS_MARKER, full_html=True, validate=False)
    tag = f'<script charset="utf-8" src="{_JS_MARKER}"></script>'
    if html.count(tag) != 1:  # a plotly whose page differs: its own writer
        pio.write_html(fig_dict, path, include_plotlyjs=True, full_html=True, validate=False)
        return
    before, after = html.split(tag)
    with open(path, "wb") as f:
        f.write(before.encode("utf-8") + b"<script>")
        f.write(_plotlyjs_bytes())
        f.write(b"</script>" + after.encode("utf-8"))


def save_figures(figures: dict[str, go.Figure | dict[str, Any]], directory: str | Path, png: bool = True,
                 svg: bool = False, scale: float = 2.0) -> dict[str, list[Path]]:
    """Write each figure as ``{name}.html`` (plotly.js embedded: opens offline), ``{name}.png`` and
    ``{name}.plotly.json`` (the figure itself, for reports). A figure may also be given as its JSON-ready dict
    (:func:`figure_dict`: what ``Figure.to_dict`` returns), which is written as it is.

    Static images need kaleido with a Chrome/Chromium; when none is found the HTML is still written
    and a warning says how to get the PNGs (``apt-get install chromium``). Inside :func:`deferred_images` they
    are queued (and listed in the result) instead of written now."""
    from wordpos.probing.io import atomic_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {name: [] for name in figures}
    import plotly.io as pio

    for name, fig in figures.items():
        # once for both files (a Figure is validated already: not again on writing)
        fig_dict = fig if isinstance(fig, dict) else fig.to_dict()
        with atomic_path(directory / f"{name}.html") as tmp:
            _write_offline_html(fig_dict, tmp)
        with atomic_path(directory / f"{name}.plotly.json") as tmp:  # for reports that re-embed the figure
            pio.write_json(fig_dict, tmp, validate=False)
        written[name] += [directory / f"{name}.html", directory / f"{name}.plotly.json"]
    formats = (["png"] if png else []) + (["svg"] if svg else [])
    if formats and (_QUEUE is None or _QUEUE.enabled):  # kaleido's batch writer wants Figures (it reads their size)
        figures = {n: fast_figure(f["data"], f["layout"]) if isinstance(f, dict) else f for n, f in figures.items()}
    for fmt in formats:
        targets = {name: directory / f"{name}.{fmt}" for name in figures}
        if _QUEUE is not None:
            if _QUEUE.enabled:
                _QUEUE.jobs += [(figures[n], p, fmt, scale) for n, p in targets.items()]
                for n, p in targets.items():
                    written[n].append(p)
            continue
        done = set(_write_images([(figures[n], p, scale) for n, p in targets.items()], fmt))
        for n, p in targets.items():
            if p in done:
                written[n].append(p)
    return written
