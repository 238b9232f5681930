"""Batch sizes from free device memory: on an accelerator, as many rows as fit; on the CPU, no suggestion.

On CUDA the free memory is :func:`torch.cuda.mem_get_info`'s; a caller says how many bytes one token of one row
costs at its peak (activations kept, patched copies, ...) and :func:`suggest_batch` returns the rows that fit in
a fraction of it. On the CPU (and any device whose free memory torch cannot report) both return ``None``, so
callers keep their measured, cache-friendly CPU sizes: RAM is rarely the limit there, the cache is.
"""

from __future__ import annotations

from typing import Any

import torch

from wordpos.probing.errors import ConfigError

HEADROOM = 0.8
"""Fraction of the free memory a suggested batch may use: the rest absorbs the allocator's fragmentation,
temporaries the estimate leaves out and other processes on the device."""


def free_memory_bytes(device: str | torch.device) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``None`` elsewhere (CPU, MPS, meta)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def suggest_batch(engine: Any, tokens_per_row: int, bytes_per_token: int | float, *,
                  headroom: float = HEADROOM, max_batch: int | None = None,
                  setting: str = "the prompt length (--n-words) or --dtype (bfloat16 halves it)") -> int | None:
    """Rows per batch that fit in ``headroom`` of ``engine.device``'s free memory, capped at ``max_batch``.

    ``tokens_per_row × bytes_per_token`` is one row's peak cost. Returns ``None`` on the CPU (keep the measured
    size). Raises ``ConfigError`` naming ``setting`` (what the caller can lower) when not even one row fits."""
    if not (isinstance(tokens_per_row, int) and tokens_per_row > 0):
        raise ConfigError(f"tokens_per_row must be a positive int, got {tokens_per_row!r}.")
    if not bytes_per_token > 0:
        raise ConfigError(f"bytes_per_token must be positive, got {bytes_per_token!r}.")
    if not 0 < headroom <= 1:
        raise ConfigError(f"headroom must be in (0, 1], got {headroom!r}.")
    if max_batch is not None and max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch!r}.")
    device = torch.device(getattr(engine, "device", engine))
    free = free_memory_bytes(device)
    if free is None:
        return None
    per_row = tokens_per_row * bytes_per_token
    usable = free * headroom
    rows = int(usable // per_row)
    if rows < 1:
        raise ConfigError(
            f"one row does not fit on {device}: {tokens_per_row} tokens × {bytes_per_token:,.0f} bytes/token = "
            f"{per_row / 2**20:,.1f} MiB, but only {free / 2**20:,.1f} MiB are free ({headroom:.0%} of it usable). "
            f"Lower {setting}, free the device, or run on a device with more memory.")
    return min(rows, max_batch) if max_batch is not None else rows
