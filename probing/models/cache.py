"""Where built and pulled models live: ``$WORDPOS_CACHE`` or the user's cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_root() -> Path:
    """The root of wordpos' cache (``$WORDPOS_CACHE`` overrides the platform default)."""
    root = os.environ.get("WORDPOS_CACHE") or platformdirs.user_cache_dir("wordpos")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
