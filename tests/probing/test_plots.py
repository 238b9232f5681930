"""Figures: HTML and JSON always; static images either now or, inside ``deferred_images``, in one kaleido call."""

from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

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
