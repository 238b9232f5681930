"""Head lists as every patching call takes them: ``"3.4,2.1"``, ``(layer, head)`` pairs, the edge graph's names and
the dicts other results hand back, parsed by one rule (:func:`parse_heads`) and checked against the model."""
from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from wordpos.probing.errors import ConfigError


# the edge graph's head names (a3.h4); a reader's "<k>"/"<v>" name a key/value head's index, not a query head's
_EDGE_HEAD = re.compile(r"a(\d+)\.h(\d+)")


def _head_index(x: Any) -> int:
    """A layer or head index: an int (numpy's and 0-d integer tensors included), a float with no fraction, or a
    string of digits; anything else (1.5, "x") is a ValueError rather than a silent truncation."""
    if isinstance(x, str):
        if not x.strip().lstrip("-").isdigit():
            raise ValueError(x)
        return int(x)
    if isinstance(x, float) or (hasattr(x, "is_floating_point") and x.is_floating_point()):
        if not float(x).is_integer():
            raise ValueError(x)
        return int(x)
    return operator.index(x)


def parse_heads(spec: str | Sequence[Any], dims: Any = None, keep_order: bool = False) -> list[tuple[int, int]]:
    """``"3.4,2.1"`` or ``[(3, 4), "2.1"]`` → ``[(2, 1), (3, 4)]`` (sorted, unique), validated against ``dims``
    when given. ``keep_order=True`` keeps the order given (for rankings). Also taken: the edge graph's names
    (``"a3.h4"``, as in ``circuit.nodes["head_names"]``), :meth:`EffectResult.top_heads`' dicts and the circuit's
    ``nodes["heads"]`` dicts, so that one call's heads go straight into the next. Reader names (``"a3.h4<k>"``) are
    refused: with grouped-query attention their index is a key/value head's."""
    if (isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, (int, np.integer)) for x in spec)
            or isinstance(spec, dict)):
        spec = [spec]  # one head given as (layer, head), or one dict
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    heads = []
    for it in items:
        if isinstance(it, dict) and "layer" in it and "index" in it:  # EffectResult.top_heads()
            it = (it["layer"], it["index"])
        elif isinstance(it, dict) and "layer" in it and not isinstance(it.get("head", ""), str):  # circuit nodes
            it = (it["layer"], it["head"])
        edge_name = _EDGE_HEAD.fullmatch(it.strip()) if isinstance(it, str) else None
        parts = edge_name.groups() if edge_name else it.strip().split(".") if isinstance(it, str) else it
        try:
            L, h = (_head_index(x) for x in parts)
        except (TypeError, ValueError):
            raise ConfigError(f"head {it!r} is not LAYER.HEAD: pass heads as '3.4,2.1', as (layer, head) pairs of "
                              "ints such as [(3, 4), (2, 1)], as edge-graph names such as 'a3.h4', or top_heads()' "
                              "dicts.") from None
        heads.append((L, h))
    if not heads:
        raise ConfigError("the head list is empty; pass heads as LAYER.HEAD, e.g. --heads 3.4,2.1.")
    if dims is not None:
        for L, h in heads:
            dims.check_head(L, h)
    return list(dict.fromkeys(heads)) if keep_order else sorted(set(heads))
