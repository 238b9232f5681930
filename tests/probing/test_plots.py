"""Figures: HTML and JSON always; static images either now or, inside ``deferred_images``, in one kaleido call."""

from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from wordpos.probing.plots import deferred_images, save_figures


def _figs(n: int) -> dict[str, go.Figure]:
    return {f"f{i}": go.Figure(go.Scatter(x=[0, 1], y=[i, i + 1])) for i in range(n)}


def _fake_writer(calls: list):
    def write_images(figs, paths, **kw):  # stands in for kaleido: one call, one file per figure
        calls.append(len(figs))
        for p in paths:
            Path(p).write_bytes(b"\x89PNG fake")
    return write_images


def test_deferred_images_are_written_in_one_call_at_flush(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(pio, "write_images", _fake_writer(calls))
    with deferred_images(True) as queue:
        a = save_figures(_figs(2), tmp_path / "a")
        b = save_figures(_figs(3), tmp_path / "b")
        assert calls == [] and not list(tmp_path.rglob("*.png"))  # nothing rendered yet
        assert (tmp_path / "a" / "f0.html").exists() and (tmp_path / "b" / "f2.plotly.json").exists()
        assert tmp_path / "a" / "f1.png" in a["f1"] and tmp_path / "b" / "f2.png" in b["f2"]
        written = queue.flush()
    assert calls == [5] and len(written) == 5 and all(p.exists() for p in written)
    assert not list(tmp_path.rglob(".*.tmp.*"))  # the atomic temporaries were renamed


def test_images_off_and_immediate(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(pio, "write_images", _fake_writer(calls))
    with deferred_images(False) as queue:
        out = save_figures(_figs(2), tmp_path / "off")
        assert queue.flush() == []
    assert calls == [] and not list((tmp_path / "off").glob("*.png"))
    assert all(not str(p).endswith(".png") for paths in out.values() for p in paths)
    save_figures(_figs(2), tmp_path / "now")  # outside the block: written at once, one call per save
    assert calls == [2] and len(list((tmp_path / "now").glob("*.png"))) == 2


def test_fast_figure_resolves_what_validation_would():
    """A named template and a string title, as plotly's validated construction turns them."""
    import plotly.graph_objects as go

    from wordpos.probing.plots import fast_figure

    data = [dict(type="scatter", x=[1, 2, None], y=[3.5, None, 1], mode="lines+markers", name="a",
                 line=dict(color="#123456", width=2, dash="dot"), visible=False),
            dict(type="scatter", x=[0], y=[0], mode="markers", marker=dict(size=[8], color=["red"]), hovertext=["h"])]
    layout = dict(title="T<br><sup>s</sup>", template="plotly_white", width=700, xaxis=dict(range=[-1, 3]))
    fast = fast_figure(data, layout)
    assert fast.to_dict() == go.Figure(data=data, layout=layout).to_dict()
    assert fast.layout.title.text == "T<br><sup>s</sup>" and fast.layout.template.layout.paper_bgcolor == "white"


def test_fast_figure_validates_later_edits():
    import pytest

    from wordpos.probing.plots import fast_figure

    fig = fast_figure([dict(type="scatter", x=[1], y=[2])], dict(title="t", template="plotly_white"))
    fig.update_layout(xaxis_title="X")
    assert fig.layout.xaxis.title.text == "X"
    with pytest.raises(ValueError):
        fig.update_layout(width="abc")


# ---- the run's figures are built without validation: each equals plotly's validated, API-built figure ----------
def _same_json(fast, ref) -> None:
    """Equal as the JSON the HTML embeds (what a browser draws), and built without validation."""
    import json

    import plotly.io as pio

    assert json.loads(pio.to_json(fast)) == json.loads(pio.to_json(ref))
    assert fast.to_dict()["layout"]["template"]["layout"]["paper_bgcolor"] == "white"


def _ref_key_plot(abs_pos, y_true, y_pred, title):
    """The key plot as plotly's API builds it (make_subplots, add_trace, update_*): the reference."""
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from wordpos.probing.plots import index_color

    pos, yt, yp = (np.asarray(a).reshape(-1) for a in (abs_pos, y_true, y_pred))
    classes = sorted(set(yt.tolist()) | set(yp.tolist()))
    rows = sorted(set(yt.tolist()))
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.02)
    for r, k in enumerate(rows, start=1):
        sel = yt == k
        xs = sorted(set(pos[sel].tolist()))
        n_at = np.array([np.sum(pos[sel] == x) for x in xs])
        for c in classes:
            frac = np.array([np.sum((pos[sel] == x) & (yp[sel] == c)) for x in xs]) / np.maximum(n_at, 1)
            fig.add_trace(go.Bar(x=xs, y=frac, name=f"predicted {c}", legendgroup=str(c), showlegend=(r == 1),
                                 marker_color=index_color(c), customdata=np.stack([n_at, frac * n_at], -1),
                                 hovertemplate=f"true {k}, predicted {c}<br>position %{{x}}<br>%{{y:.1%}} "
                                               "(%{customdata[1]:.0f} of %{customdata[0]})<extra></extra>"),
                          row=r, col=1)
        fig.update_yaxes(range=[0, 1], tickformat=".0%", nticks=3, title_text=f"true {k}", row=r, col=1)
    fig.update_layout(barmode="stack", title=title, height=110 * len(rows) + 160, bargap=0.1,
                      legend=dict(traceorder="normal", title="predicted index"), template="plotly_white")
    fig.update_xaxes(title_text="absolute token position", row=len(rows), col=1)
    return fig


def test_probe_figures_equal_plotly_api_figures():
    import numpy as np
    import plotly.graph_objects as go

    from wordpos.probing.plots import confusion_heatmap, key_plot, layer_curve

    rng = np.random.default_rng(0)
    for n_rows in (1, 4, 7):
        yt = rng.integers(0, n_rows, 300)
        yp = np.where(rng.random(300) < 0.7, yt, rng.integers(0, n_rows, 300))
        pos = 19 + yt * 2 + rng.integers(0, 3, 300)
        _same_json(key_plot(pos, yt, yp, "K"), _ref_key_plot(pos, yt, yp, "K"))
        _same_plain(key_plot(pos, yt, yp, "K", as_dict=True), key_plot(pos, yt, yp, "K"))

    per, val = {0: 0.3, 1: 0.6, 2: 0.9}, {0: 0.35, 1: 0.65, 2: 0.95}
    for shuffled, pv in ((None, None), (0.14, val)):
        ref = go.Figure()
        ref.add_trace(go.Scatter(x=[0, 1, 2], y=[0.3, 0.6, 0.9], mode="lines+markers", name="probe (held-out words)",
                                 line=dict(color="#1f77b4", width=3)))
        if pv:
            ref.add_trace(go.Scatter(x=[0, 1, 2], y=[0.35, 0.65, 0.95], mode="lines",
                                     name="probe (validation, train words)", line=dict(color="#1f77b4", dash="dot")))
        ref.add_hline(y=0.5, line=dict(color="#d62728", dash="dash"), annotation_text="position-only baseline 50.0%",
                      annotation_position="bottom right")
        if shuffled is not None:
            ref.add_hline(y=shuffled, line=dict(color="#7f7f7f", dash="dot"), annotation_text="shuffled labels 14.0%",
                          annotation_position="top right")
        ref.update_layout(title="L", xaxis_title="layer (residual stream after block)", yaxis_title="accuracy",
                          yaxis=dict(range=[0, 1], tickformat=".0%"), template="plotly_white")
        _same_json(layer_curve(per, 0.5, "L", shuffled=shuffled, per_layer_val=pv), ref)
        _same_plain(layer_curve(per, 0.5, "L", shuffled=shuffled, per_layer_val=pv, as_dict=True),
                    layer_curve(per, 0.5, "L", shuffled=shuffled, per_layer_val=pv))

    cm = rng.integers(0, 20, (7, 7))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    labels = [str(i) for i in range(7)]
    ref = go.Figure(go.Heatmap(z=norm, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1, text=cm,
                               texttemplate="%{text}",
                               hovertemplate="true %{y}, predicted %{x}: %{z:.1%}<extra></extra>"))
    ref.update_layout(title="C", xaxis_title="predicted word index", yaxis_title="true word index",
                      yaxis=dict(autorange="reversed"), template="plotly_white")
    _same_json(confusion_heatmap(cm, "C"), ref)
    _same_plain(confusion_heatmap(cm, "C", as_dict=True), confusion_heatmap(cm, "C"))


def _same_plain(plain, fig):
    """The JSON-ready dict (``as_dict=True``: what ``wordpos run`` writes) is the Figure's JSON (the same values;
    plotly's Figure sorts the keys of numbered subplot axes such as ``yaxis2``, which the dict keeps as built)."""
    import json

    import plotly.io as pio

    assert isinstance(plain, dict)
    assert json.loads(pio.to_json(plain, validate=False)) == json.loads(pio.to_json(fig))


def test_grid_layouts_are_make_subplots_layouts():
    """``subplot_layout`` computes a plain grid's layout as plotly's ``make_subplots`` does (the reference): the same
    JSON, key order included, for grids of 1-8 rows and 1-4 columns with shared x axes, spacings and subplot titles
    (some empty, more or fewer than the cells); other arguments go to ``make_subplots`` itself."""
    import json

    from plotly.subplots import make_subplots

    from wordpos.probing.plots import _grid_layout, subplot_layout

    for rows in range(1, 9):
        for cols in range(1, 5):
            for kw in ({}, dict(shared_xaxes=True, vertical_spacing=0.02), dict(shared_xaxes=True),
                       dict(subplot_titles=[f"head {i}" for i in range(rows * cols - 1)] + [""],
                            horizontal_spacing=0.1, vertical_spacing=0.45 / rows),
                       dict(subplot_titles=["a"] * (rows * cols + 2)), dict(subplot_titles=[""] * rows * cols),
                       dict(subplot_titles=["t"], shared_xaxes=True, vertical_spacing=0.3 / rows)):
                ref = make_subplots(rows=rows, cols=cols, **kw).to_dict()["layout"]
                ref.pop("template")
                assert json.dumps(_grid_layout(rows, cols, **kw)) == json.dumps(ref), (rows, cols, kw)
                assert json.dumps(subplot_layout(rows, cols, **kw)) == json.dumps(ref)
    for kw in (dict(shared_yaxes=True), dict(shared_xaxes="all")):  # not a plain grid: make_subplots' own
        ref = make_subplots(rows=3, cols=2, **kw).to_dict()["layout"]
        ref.pop("template")
        assert subplot_layout(3, 2, **kw) == ref
    # what make_subplots refuses is refused with its error (a grid too tall for its spacing, no rows)
    for rows, cols, kw in ((60, 1, dict(shared_xaxes=True, vertical_spacing=0.02)), (0, 1, {}),
                           (2, 2, dict(horizontal_spacing=1.5))):
        with pytest.raises(ValueError):
            make_subplots(rows=rows, cols=cols, **kw)
        with pytest.raises(ValueError):
            subplot_layout(rows, cols, **kw)


def test_fast_figure_writes_out_named_colorscales():
    import plotly.graph_objects as go

    from wordpos.probing.plots import fast_figure

    trace = dict(type="heatmap", z=[[1, 2]], colorscale="RdBu")
    marker = dict(type="scatter", x=[1], y=[1], mode="markers", marker=dict(color=[1], colorscale="Viridis"))
    fast = fast_figure([trace, marker], {})
    assert fast.to_dict()["data"] == go.Figure(data=[trace, marker]).to_dict()["data"]
    assert trace["colorscale"] == "RdBu" and marker["marker"]["colorscale"] == "Viridis"  # the caller's dicts kept


def test_figure_dict_is_plotlys_to_dict():
    """``figure_dict`` (no Figure made) gives what plotly's ``to_dict`` gives for the same plain dicts (of the Figure
    ``fast_figure`` makes: the one written before; its equality to the validated figure is tested above): numpy arrays
    as typed arrays under plotly's rules (64-bit integers narrowed or kept, 2-D shapes, empty arrays, arrays under a
    ``range`` key or inside a list left alone, dtypes plotly.js has no name for kept), a named template and
    colorscale, a string title; the caller's dicts are not changed."""
    import json

    import numpy as np
    from plotly.utils import PlotlyJSONEncoder

    from wordpos.probing.plots import fast_figure, figure_dict

    f8 = np.array([0.5, np.nan, 2.0])
    data = [dict(type="scatter", x=f8, y=np.arange(3, dtype=np.float32), mode="lines", name="a",
                 customdata=np.array([1, 2, 2**40]), meta=[np.array([1.0, 2.0]), 3],
                 marker=dict(color=np.array([1, -2, 3]), size=np.array([4, 5, 300], dtype=np.uint64),
                             colorscale="Viridis", opacity=np.array([True, False, True]))),
            dict(type="heatmap", z=np.arange(6.0).reshape(2, 3), colorscale="RdBu", text=np.array([], dtype=float)),
            dict(type="scatter", x=[1, 2], y=(3, 4), hovertext=["h", "i"])]
    data.append(dict(type="bar", x=[1], y=[2], name=None))  # a property set to None: plotly leaves it out
    layout = dict(title="T", template="plotly_white", xaxis=dict(range=np.array([0.0, 3.0])), width=700, height=None)
    before = json.dumps([data, layout], cls=PlotlyJSONEncoder, sort_keys=True)
    ref = fast_figure(data, layout).to_dict()  # plotly's Figure and its to_dict (what was written before)
    got = figure_dict(data, layout)
    as_json = lambda d: json.dumps(d, cls=PlotlyJSONEncoder)  # noqa: E731 - (key order included)
    assert as_json(got) == as_json(ref)
    assert got["data"][0]["x"]["dtype"] == "f8" and got["data"][0]["customdata"].dtype == np.int64  # (kept: > 2^31)
    assert got["data"][0]["marker"]["color"]["dtype"] == "i1" and got["data"][1]["z"]["shape"] == "2, 3"
    assert json.dumps([data, layout], cls=PlotlyJSONEncoder, sort_keys=True) == before
    assert isinstance(data[0]["x"], np.ndarray) and layout["template"] == "plotly_white"


def test_save_figures_writes_a_figure_dict_as_the_figure(tmp_path):
    """A figure given as its dict (``figure_dict``) is written as the Figure is: the same JSON file, the same page
    up to its random div id; with images asked for, it is made a Figure for kaleido."""
    import json
    import re

    import numpy as np

    from wordpos.probing import plots
    from wordpos.probing.plots import fast_figure, figure_dict

    uid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    data = [dict(type="scatter", x=np.linspace(0, 1, 5), y=np.array([1.0, np.nan, 3, 4, 5]), name="s")]
    layout = dict(title="T", template="plotly_white")
    save_figures({"fig": fast_figure(data, layout)}, tmp_path / "a", png=False)
    save_figures({"fig": figure_dict(data, layout)}, tmp_path / "b", png=False)
    for name in ("fig.plotly.json", "fig.html"):
        a, b = (uid.sub("ID", (tmp_path / d / name).read_text(encoding="utf-8")) for d in "ab")
        assert a == b
    with plots.deferred_images(True) as queue:
        save_figures({"fig": figure_dict(data, layout)}, tmp_path / "c", png=True)
        (fig, path, fmt, _), = queue.jobs
    import plotly.io as pio

    assert fmt == "png" and path.name == "fig.png" and fig.layout.title.text == "T"
    # the same figure (its arrays as typed arrays, which plotly.js reads; the template's keys in another order)
    assert json.loads(pio.to_json(fig)) == json.loads(pio.to_json(fast_figure(data, layout)))


def test_save_figures_writes_what_plotly_writes(tmp_path):
    """One ``to_dict`` serves both files: they equal plotly's own ``write_json``/``write_html`` of the figure
    (the HTML up to its random div id)."""
    import re

    from wordpos.probing.plots import key_plot

    from wordpos.probing.plots import _JS_MARKER

    uid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    # a title holding the placeholder's tag is escaped in the page's JSON, so the split still finds one tag
    for title in ("K", f'<script charset="utf-8" src="{_JS_MARKER}"></script>'):
        fig = key_plot([19, 20, 21, 22], [0, 0, 1, 1], [0, 1, 1, 1], title)
        save_figures({"k": fig}, tmp_path, png=False)
        fig.write_json(tmp_path / "ref.json")
        fig.write_html(tmp_path / "ref.html", include_plotlyjs=True, full_html=True)
        assert (tmp_path / "k.plotly.json").read_text() == (tmp_path / "ref.json").read_text()
        got, ref = (uid.sub("ID", (tmp_path / n).read_text(encoding="utf-8")) for n in ("k.html", "ref.html"))
        assert got == ref and "true 1, predicted 1" in got and "plotly.js v" in got


def test_subplot_figures_take_row_col_edits_like_make_subplots():
    """The key plot and the attention grid keep make_subplots' grid reference: row/col edits land on the same axes
    as on the API-built reference, and ``get_subplot`` works."""
    import json

    import numpy as np
    import plotly.io as pio

    from wordpos.patching.plots import attention_patterns
    from wordpos.probing.plots import key_plot

    yt = np.array([0, 0, 1, 1, 2, 2])
    fast, ref = key_plot(19 + yt, yt, yt, "K"), _ref_key_plot(19 + yt, yt, yt, "K")
    for fig in (fast, ref):
        fig.update_yaxes(range=[0, 2], row=2, col=1)
        fig.add_annotation(text="here", x=20, y=1, row=3, col=1)
    assert json.loads(pio.to_json(fast)) == json.loads(pio.to_json(ref))
    assert fast.get_subplot(2, 1).yaxis.range == (0, 2)
    pats = {"0.1": np.eye(3), "1.2": np.eye(3), "1.3": np.eye(3), "2.0": np.eye(3)}
    att = attention_patterns(pats, ["a", "b", "c"], "A")
    att.update_xaxes(tickangle=0, row=2, col=1)
    assert att.layout.xaxis4.tickangle == 0 and att.layout.xaxis.tickangle == -60


def test_hline_writes_what_add_hline_adds_and_refuses_other_positions():
    import plotly.graph_objects as go
    import pytest

    from wordpos.probing.errors import ConfigError
    from wordpos.probing.plots import HLINE_POSITIONS, hline

    for pos in HLINE_POSITIONS:
        ref = go.Figure(go.Scatter(x=[0, 1], y=[0, 1]))
        ref.add_hline(y=0.3, line=dict(color="red", width=2), annotation_text="t", annotation_position=pos)
        layout: dict = {}
        hline(layout, 0.3, dict(color="red", width=2), "t", pos)
        got = go.Figure(go.Scatter(x=[0, 1], y=[0, 1]), layout=layout).to_dict()["layout"]
        want = ref.to_dict()["layout"]
        assert got["shapes"] == want["shapes"] and got["annotations"] == want["annotations"], pos
    for bad in ("top", "left", "left top", "middle"):
        with pytest.raises(ConfigError, match="hline labels"):
            hline({}, 0.3, {}, "t", bad)
