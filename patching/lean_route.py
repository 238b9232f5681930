"""The runner's hook-free route for head-output edits: a patched forward whose only edits are at ``hook_z`` (head
ablation: zero, mean, resample; head activation patching), from tokens or a cached residual, runs on
:class:`~wordpos.probing.engines.lean.LeanBlocks` instead of the bridge's ``run_with_hooks``.

Why: on a GPU the bridge's per-forward host work (its hook and alias maps rebuilt twice per call, a wrapper per
module, Hugging Face's per-layer Python) is about as long as the device work of a batch of ablated prompts, so
ablation's dozens of forwards wait on the host (``docs/performance.md``). The lean blocks are the edge runner's,
already checked there. Here, before the first forward of each depth and kind of input, two rows of it run both ways,
unedited, and are compared (the edge runner's tolerance, :func:`~wordpos.patching.edge_runner.route_mismatch`); on
a mismatch that model keeps the bridge for that depth, with a warning. Anything else (other hooks, cached activations, gradients, a model the lean blocks do
not cover) returns None and the caller runs the bridge.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from wordpos.probing.engines.lean import LeanBlocks, lean_unsupported

#: "auto": on accelerators, whose forwards are bound by the host's work per forward (on the CPU the bridge keeps the
#: numbers of earlier runs bit for bit: the two routes round differently, and a probe re-fitted on ablated
#: activations can move by a sample); True: everywhere; False: never (tests and benchmarks choose)
ENABLED: bool | str = "auto"

_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")
# the model (engines are made afresh per call) -> {(stop layer, dtype, device, weights' address): LeanBlocks
# (checked), or why not}; a model moved or cast gets new blocks and a new check
_STATE: "weakref.WeakKeyDictionary[Any, dict[tuple, LeanBlocks | str]]" = weakref.WeakKeyDictionary()


def route_state(engine: Any) -> dict[int, LeanBlocks | str]:
    """What the route decided for ``engine``'s model, by stop layer: the checked blocks, or why the bridge is kept."""
    return {key[0]: v for key, v in _STATE.get(getattr(engine, "model", None), {}).items()} \
        if getattr(engine, "model", None) is not None else {}


def _key(engine: Any, x: Tensor, stop: int) -> tuple:
    """A check holds for a depth, a kind of input (tokens or a residual), a dtype and device, and these weights."""
    hf = getattr(engine.model, "original_model", None)
    first = next(hf.parameters(), None) if hf is not None else None
    return stop, x.dim() == 2, x.dtype, x.device, None if first is None else first.data_ptr()


def lean_z_run(engine: Any, x: Tensor, hooks: Sequence[tuple[str, Callable[[Tensor, str], Tensor | None]]], *,
               stop_at_layer: int | None, start_at_layer: int | None, past: Any = None) -> Tensor | None:
    """``engine.run(x, hooks=hooks, stop_at_layer=..., start_at_layer=..., past=past)[0]`` on the lean blocks,
    for ``x`` the residual entering block ``start_at_layer`` (or token ids, with ``start_at_layer`` None) and
    ``hooks`` at ``hook_z`` only; None where the route does not apply (the caller runs the bridge)."""
    tokens = start_at_layer is None
    if ENABLED is False or (ENABLED == "auto" and x.device.type == "cpu"):
        return None
    if stop_at_layer is None or x.dim() != (2 if tokens else 3) or torch.is_grad_enabled():
        return None
    by_layer: dict[int, list[tuple[str, Callable]]] = {}
    for name, fn in hooks:
        m = _Z.match(name)
        if m is None:
            return None
        by_layer.setdefault(int(m.group(1)), []).append((name, fn))
    model = getattr(engine, "model", None)
    if model is None:
        return None
    try:
        state = _STATE.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: no cache of checks, no route
        return None
    key = _key(engine, x, stop_at_layer)
    blocks = state.get(key)
    if isinstance(blocks, str):
        return None
    first = 0 if tokens else start_at_layer
    if blocks is None:
        reason = lean_unsupported(engine)
        if reason is None:
            blocks = LeanBlocks(engine, stop_at_layer)
            if not 0 <= first < blocks.n_layers:
                return None
            reason = _check(engine, blocks, x, stop_at_layer, start_at_layer, past)
        state[key] = reason if reason is not None else blocks
        if reason is not None:
            return None
    if not 0 <= first < blocks.n_layers:
        return None

    def z_edit(L: int, z: Tensor) -> Tensor:
        for name, fn in by_layer.get(L, ()):
            new = fn(z, name)
            z = z if new is None else new
        return z

    kv = None if past is None else (past.keys, past.values)
    p0 = 0 if past is None else past.length
    resid = blocks.embed(x, p0) if tokens else x
    return blocks.forward(resid, start=p0, past=kv, first=first, z_edit=z_edit if by_layer else None)


def _check(engine: Any, blocks: LeanBlocks, x: Tensor, stop: int, start: int | None, past: Any) -> str | None:
    """The lean blocks against the bridge on the first two rows of a first input of this kind, unedited (the edits
    are the runner's own functions, applied alike): why not to use them, or None."""
    from wordpos.patching.edge_runner import route_mismatch
    from wordpos.probing.engines.split_inputs import PrefixKV

    n = min(2, int(x.shape[0]))
    pk = None if past is None else PrefixKV([k[:n] for k in past.keys], [v[:n] for v in past.values])
    ref, _ = engine.run(x[:n], stop_at_layer=stop, start_at_layer=start, past=pk)
    p0 = 0 if pk is None else pk.length
    resid = blocks.embed(x[:n], p0) if start is None else x[:n]
    out = blocks.forward(resid, start=p0, past=None if pk is None else (pk.keys, pk.values),
                         first=0 if start is None else start)
    return route_mismatch(out, ref, "the lean forward of head edits differs from the bridge's", "using the bridge")


__all__ = ["ENABLED", "lean_z_run", "route_state"]
