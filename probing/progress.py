"""Progress bars that suit where the output goes.

On a terminal and in a Jupyter notebook, :func:`progress_bar` is an ordinary ``tqdm.auto`` bar (a widget where
ipywidgets is installed). When stderr is neither (CI logs, ``nohup``, a script's redirected output), a redrawn bar
floods the log with one line per update, so the bar is silent while it runs and prints one summary line when it
closes: ``desc: 528 patch in 4.2 s``.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

from tqdm import TqdmWarning

with warnings.catch_warnings():  # in a notebook without ipywidgets tqdm.auto falls back to text bars, which
    warnings.simplefilter("ignore", TqdmWarning)  # redraw in place there too: its advice to install them is noise
    from tqdm.auto import tqdm


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (IPython with a kernel attached), where tqdm.auto draws a live bar
    that redraws in place, although stderr is not a terminal."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _interactive() -> bool:
    try:
        if sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    return _in_notebook()


class _QuietBar(tqdm):
    """A disabled tqdm bar that still counts, and says in one line what it did when it closes."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._wp_desc = kwargs.get("desc") or ""
        self._wp_unit = kwargs.get("unit") or "it"
        self._wp_t0 = time.perf_counter()
        self._wp_count = 0
        self._wp_closed = False
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        self._wp_count += 1 if n is None else n
        return super().update(n)

    def __iter__(self):
        try:
            for item in self.iterable:
                self._wp_count += 1
                yield item
        finally:
            self.close()

    def close(self) -> None:
        if not self._wp_closed:
            self._wp_closed = True
            dt = time.perf_counter() - self._wp_t0
            print(f"{self._wp_desc or 'progress'}: {self._wp_count:g} {self._wp_unit} in {dt:.1f} s", file=sys.stderr,
                  flush=True)
        super().close()


def progress_bar(*args: Any, disable: bool = False, **kwargs: Any) -> tqdm:
    """``tqdm(...)`` on a terminal; one line per bar when stderr is a file or pipe; nothing when ``disable``."""
    if disable:
        return tqdm(*args, disable=True, **kwargs)
    if _interactive():
        return tqdm(*args, **kwargs)
    return _QuietBar(*args, **kwargs)
