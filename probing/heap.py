"""The command line's handling of Python's cyclic garbage collector.

Importing torch, transformers and TransformerLens and loading a model create about half a million long-lived
objects and almost no cyclic garbage, yet while they pile up the collector scans the whole heap about ten times
(1.8-2.5 s of an organism ``wordpos run`` on 2 cores). The command line pauses the collector
until the model is loaded, then freezes what exists (:func:`gc.freeze`: never scanned again, so later full
collections cost what the run itself allocated) and resumes it. Library callers are left alone: nothing here
runs unless :func:`pause_until_loaded` was called.
"""

from __future__ import annotations

import gc

_paused = False
_froze = False  # this module froze the heap (and nothing else had): resume() unfreezes it


def pause_until_loaded() -> None:
    """Pause the collector until :func:`model_loaded` (or :func:`resume`) is called; for a process's entry point."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def model_loaded() -> None:
    """Called by ``load_model`` and ``make_engine`` (every engine; the command line loads models through it): if
    the collector was paused here, freeze the heap built so far and resume it."""
    global _paused, _froze
    if _paused:
        _paused = False
        _froze = gc.get_freeze_count() == 0
        gc.freeze()
        gc.enable()


def resume() -> None:
    """End of the entry point: resume a collector still paused (a command that loaded no model, or failed before it
    did) and unfreeze what :func:`model_loaded` froze, so a process that calls ``main`` again (tests, notebooks)
    collects the garbage of the last command like any other."""
    global _paused, _froze
    if _paused:
        _paused = False
        gc.enable()
    if _froze:
        _froze = False
        gc.unfreeze()
