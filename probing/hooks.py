"""One name per activation site: TransformerLens hook names, built in one place.

Every module (activations, patching, circuit, the nnsight engine) speaks these names, so a site
looks the same in a cache, a patch, a saved result and a plot.
"""

from __future__ import annotations

import re
from typing import Literal

ResidKind = Literal["resid_pre", "resid_mid", "resid_post"]

_RESID_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post)$")


def resid(layer: int, kind: ResidKind = "resid_post") -> str:
    """``blocks.{layer}.hook_{kind}``: the residual stream before/after block ``layer``."""
    return f"blocks.{layer}.hook_{kind}"


def attn_z(layer: int) -> str:
    """Per-head attention output before W_O: ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_z"


def attn_pattern(layer: int) -> str:
    """Attention probabilities ``[batch, head, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def attn_out(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def mlp_out(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def attn_qkv(layer: int, which: Literal["q", "k", "v"]) -> str:
    """Queries, keys or values ``[batch, pos, head, d_head]`` (keys and values have one slot per
    key/value head in grouped-query attention)."""
    if which not in ("q", "k", "v"):
        raise ValueError(f"which must be 'q', 'k' or 'v', got {which!r}")
    return f"blocks.{layer}.attn.hook_{which}"


def parse_resid(name: str) -> tuple[int, ResidKind]:
    m = _RESID_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a residual-stream hook name like 'blocks.3.hook_resid_post'")
    return int(m.group(1)), m.group(2)  # type: ignore[return-value]


def stop_layer_for(layer: int, kind: ResidKind = "resid_post") -> int:
    """The ``stop_at_layer`` that still computes ``resid(layer, kind)``: blocks up to and including
    ``layer`` for resid_mid/resid_post, blocks before ``layer`` for resid_pre."""
    return layer if kind == "resid_pre" else layer + 1
