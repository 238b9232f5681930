"""Progress bars: a live bar on a terminal or in a Jupyter kernel, one summary line in a log."""
import sys
import types

from tqdm.auto import tqdm

from wordpos.probing.progress import _QuietBar, progress_bar


def _ipython(monkeypatch, shell):
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))


def test_a_log_gets_one_line_per_bar(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    bar = progress_bar(range(5), desc="patching", unit="patch")
    assert isinstance(bar, _QuietBar)
    assert sum(1 for _ in bar) == 5
    err = capsys.readouterr().err  # pytest's captured stderr is not a terminal
    assert err.count("\n") == 1 and err.startswith("patching: 5 patch in ")


def test_a_notebook_kernel_gets_a_live_bar(monkeypatch):
    _ipython(monkeypatch, types.SimpleNamespace(kernel=object()))  # IPython with a kernel: Jupyter
    bar = progress_bar(total=3, desc="x")
    assert isinstance(bar, tqdm) and not isinstance(bar, _QuietBar) and not bar.disable
    bar.close()
    _ipython(monkeypatch, types.SimpleNamespace())  # terminal IPython with its output piped: still a log
    assert isinstance(progress_bar(total=3), _QuietBar)
    _ipython(monkeypatch, None)  # IPython imported, no shell running
    assert isinstance(progress_bar(total=3), _QuietBar)
    assert progress_bar(total=3, disable=True).disable
