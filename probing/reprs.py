"""Short reprs for the data and result objects a notebook displays: their sizes and headline numbers, never their
tensors or word lists (a dataclass's own repr printed a 4,096-prompt dataset as ~170,000 characters and a patching
context as ~275,000). The full contents stay one attribute away; configs keep their dataclass reprs."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["array_summary", "clipped", "percent", "short_repr"]


def array_summary(x: Any) -> str:
    """``float32[1024×36] cuda:0`` for a tensor, ``float64[2×4]`` for an array (the device only when not the CPU)."""
    if isinstance(x, torch.Tensor):
        dtype, dev = str(x.dtype).removeprefix("torch."), "" if x.device.type == "cpu" else f" {x.device}"
    elif isinstance(x, np.ndarray):
        dtype, dev = str(x.dtype), ""
        if isinstance(x, np.memmap):
            dev = " memmap"
    else:
        return type(x).__name__
    return f"{dtype}[{'×'.join(str(int(n)) for n in x.shape)}]{dev}"


def clipped(items: Iterable[Any], limit: int = 6) -> str:
    """``a, b, c, … (+7 more)``: the first ``limit`` items and how many were left out."""
    items = [str(i) for i in items]
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f", … (+{more} more)" if more > 0 else "")


def percent(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100.0 * x:.1f}%"


def short_repr(obj: Any, parts: Sequence[str]) -> str:
    """``Name(part; part; …)``: the empty parts dropped."""
    return f"{type(obj).__name__}({'; '.join(p for p in parts if p)})"
