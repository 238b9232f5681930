"""The runner's hook-free route for head-output edits: a patched forward whose only edits are at ``hook_z`` (head
ablation: zero, mean, resample; head activation patching), from tokens or a cached residual, runs on
:class:`~wordpos.probing.engines.lean.LeanBlocks` instead of the bridge's ``run_with_hooks``.

Why: on a GPU the bridge's per-forward host work (its hook and alias maps rebuilt twice per call, a wrapper per
module, Hugging Face's per-layer Python) is about as long as the device work of a batch of ablated prompts, so
ablation's dozens of forwards wait on the host (``docs/performance.md``). The lean blocks are the edge runner's,
already checked there (built here with no per-head weight copies). Before the first forward of each depth, kind of
input, start layer and prefix, two rows of it run both ways, unedited, and are compared (the edge runner's
tolerance); on a mismatch that model keeps the bridge for such forwards, with a warning. A model moved, cast or given
new parameters gets new blocks and new checks; a hook on the blocks' modules (TransformerLens' persistent hooks,
torch forward hooks) sends the forward to the bridge, which runs it. Such a forward may also keep its ``hook_z`` and
``hook_resid_pre`` activations (the unpatched cached runs of ablation). Anything else (other edits, other cached
activations, gradients, a model the lean blocks do not cover, a failure of the route) returns None and the caller
runs the bridge.
"""

from __future__ import annotations

import contextlib
import logging
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from wordpos.probing.engines.lean import LeanBlocks, lean_unsupported

#: "auto": on accelerators, whose forwards are bound by the host's work per forward (on the CPU the bridge keeps the
#: numbers of earlier runs bit for bit: the two routes round differently, and a probe re-fitted on ablated
#: activations can move by a sample); True: everywhere; False: never (tests and benchmarks choose)
ENABLED: bool | str = "auto"


@contextlib.contextmanager
def forced(on: bool) -> Iterator[None]:
    """The route on (True) or off (False) everywhere inside the block, ``ENABLED`` restored after it (the
    benchmarks and the device parity script time and compare the two)."""
    global ENABLED
    before, ENABLED = ENABLED, on
    try:
        yield
    finally:
        ENABLED = before


_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
log = logging.getLogger(__name__)


@dataclass
class _ModelState:
    """One model's route: its blocks (all of them, no weight copies), the parameters they were made for (each
    module's slot, the parameter object, its address), the modules whose hooks they would bypass (per block, and
    those the token embedding passes), and the verdict of each check."""

    device: torch.device
    params: list[tuple[Any, str, Any, int]]
    blocks: LeanBlocks | None
    block_modules: list[list[Any]] = field(default_factory=list)
    embed_modules: list[Any] = field(default_factory=list)
    verdicts: dict[tuple, str | None] = field(default_factory=dict)  # check key -> None (agrees) or why not

    def current(self, device: torch.device) -> bool:
        """Whether the model is still what the blocks were made for: no parameter replaced, moved or cast."""
        return device == self.device and all(mod._parameters.get(name) is p and p.data_ptr() == ptr
                                             for mod, name, p, ptr in self.params)


# the model (engines are made afresh per call) -> its state; a model moved, cast or given new parameters gets new
# blocks and new checks (the old ones are dropped)
_STATE: "weakref.WeakKeyDictionary[Any, _ModelState]" = weakref.WeakKeyDictionary()


def route_state(engine: Any) -> dict[tuple, str | None]:
    """What the route decided for ``engine``'s model: ``(stop layer, "tokens" | "resid", start layer, cached prefix)
    -> None`` where it runs, or why the bridge is kept."""
    st = _STATE.get(getattr(engine, "model", None)) if getattr(engine, "model", None) is not None else None
    return dict(st.verdicts) if st is not None else {}


_INTERNAL = ("transformers.", "transformer_lens.")


def _has_hooks(modules: list[Any]) -> bool:
    """Whether any of ``modules`` (the bridge's hook points and the blocks' Hugging Face modules) holds a hook the
    lean blocks would not run: one on a TransformerLens hook point (a persistent hook: ``run_with_hooks`` removes its
    own), or a torch hook from outside transformers and TransformerLens (theirs capture outputs and change none)."""
    from transformer_lens.hook_points import HookPoint

    for m in modules:
        if isinstance(m, HookPoint):
            if m._forward_hooks or m._forward_pre_hooks:
                return True
            continue
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
            if not (getattr(h, "__module__", None) or "").startswith(_INTERNAL):
                return True
    return False


def _unique(modules: Any) -> list[Any]:
    seen, out = set(), []
    for m in modules:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _state(engine: Any, x: Tensor) -> _ModelState | None:
    model = engine.model
    try:
        st = _STATE.get(model)
    except TypeError:  # a model that cannot be weakly referenced: no route
        return None
    if st is not None and st.current(x.device):
        return st
    hf = getattr(model, "original_model", None)
    params = [] if hf is None else [(mod, name, p, p.data_ptr()) for mod in hf.modules()
                                     for name, p in mod._parameters.items() if p is not None]
    reason = lean_unsupported(engine)
    blocks = LeanBlocks(engine, len(model.blocks), per_head=False) if reason is None else None
    st = _ModelState(x.device, params, blocks, verdicts={} if reason is None else {("any",): reason})
    if blocks is not None:
        from transformer_lens.hook_points import HookPoint

        st.block_modules = [_unique([m for m in b.modules() if m is not b]) for b in model.blocks]
        st.embed_modules = _unique([m for n, m in model.named_modules() if isinstance(m, HookPoint)
                                    and not n.startswith("blocks.")] + list(
            (hf.transformer.wte, hf.transformer.wpe) if blocks.arch == "gpt2" else (hf.model.embed_tokens,)))
    try:
        _STATE[model] = st
    except TypeError:  # pragma: no cover - a model that cannot be weakly referenced
        return None
    return st


def lean_run(engine: Any, x: Tensor, hooks: Sequence[tuple[str, Callable[[Tensor, str], Tensor | None]]], *,
             stop_at_layer: int | None, start_at_layer: int | None, past: Any = None, cache: Sequence[str] = ()
             ) -> tuple[Tensor, dict[str, Tensor]] | None:
    """``engine.run(x, hooks=hooks, cache=cache, stop_at_layer=..., start_at_layer=..., past=past)`` on the lean
    blocks, for ``x`` the residual entering block ``start_at_layer`` (or token ids, with ``start_at_layer`` None),
    ``hooks`` at ``hook_z`` only and ``cache`` naming ``hook_z`` (after the edits) and ``hook_resid_pre`` activations
    of the blocks the forward runs: ``(out, cache)`` as ``engine.run`` returns them, or None where the route does not
    apply (the caller runs the bridge). Unpatched cached runs (the mean-ablation reference, the run every ablated
    forward starts from) thus skip the bridge's per-forward host work too."""
    tokens = start_at_layer is None
    if ENABLED is False or (ENABLED == "auto" and x.device.type == "cpu"):
        return None
    if stop_at_layer is None or x.dim() != (2 if tokens else 3) or torch.is_grad_enabled():
        return None
    first = 0 if tokens else int(start_at_layer)
    by_layer: dict[int, list[tuple[str, Callable]]] = {}
    for name, fn in hooks:
        m = _Z.match(name)
        if m is None:
            return None
        by_layer.setdefault(int(m.group(1)), []).append((name, fn))
    keep_z: dict[int, str] = {}
    keep_resid: dict[int, str] = {}
    for name in cache:
        m, r = _Z.match(name), _RESID_PRE.match(name)
        if m is None and r is None:
            return None
        L = int((m or r).group(1))  # type: ignore[union-attr]
        if not first <= L < stop_at_layer + (r is not None):  # (the input of block stop is the output)
            return None
        (keep_z if m is not None else keep_resid)[L] = name
    if getattr(engine, "model", None) is None or not 0 <= first < stop_at_layer:
        return None
    try:
        st = _state(engine, x)
        if st is None or st.blocks is None or stop_at_layer > st.blocks.n_layers or \
                any(L >= st.blocks.n_layers for L in keep_resid):
            return None
        if _has_hooks([m for L in range(first, stop_at_layer) for m in st.block_modules[L]]) or \
                (tokens and _has_hooks(st.embed_modules)):
            return None
        key = (stop_at_layer, "tokens" if tokens else "resid", first, past is not None)
        if key not in st.verdicts:
            st.verdicts[key] = _check(engine, st.blocks, x, stop_at_layer, start_at_layer, past)
            if st.verdicts[key] is not None:
                log.warning("lean route: %s; the bridge runs these forwards", st.verdicts[key])
        if st.verdicts[key] is not None:
            return None

        kept: dict[str, Tensor] = {}

        def z_edit(L: int, z: Tensor) -> Tensor:
            for name, fn in by_layer.get(L, ()):
                new = fn(z, name)
                z = z if new is None else new
            if L in keep_z:
                kept[keep_z[L]] = z
            return z

        def tap(L: int, resid: Tensor) -> None:
            if L in keep_resid:
                kept[keep_resid[L]] = resid

        out = _lean(st.blocks, x, start_at_layer, stop_at_layer, past, z_edit if by_layer or keep_z else None,
                    tap if keep_resid else None)
        if stop_at_layer in keep_resid:
            kept[keep_resid[stop_at_layer]] = out
        return out, {name: kept[name] for name in cache}
    except Exception as e:  # noqa: BLE001 - any failure of the route means: the bridge runs it
        log.warning("lean route failed (%s: %s); the bridge runs this forward", type(e).__name__, e, exc_info=True)
        return None


def _lean(blocks: LeanBlocks, x: Tensor, start: int | None, stop: int, past: Any, z_edit: Any = None,
          tap: Any = None) -> Tensor:
    """The lean blocks' answer to what ``engine.run(x, stop_at_layer=stop, start_at_layer=start, past=past)`` is
    asked (``x`` token ids when ``start`` is None), with ``z_edit`` on the head outputs and ``tap`` on each block's
    input."""
    p0 = 0 if past is None else past.length
    resid = blocks.embed(x, p0) if start is None else x
    return blocks.forward(resid, start=p0, past=None if past is None else (past.keys, past.values),
                          first=0 if start is None else start, stop=stop, z_edit=z_edit, tap=tap)


def _check(engine: Any, blocks: LeanBlocks, x: Tensor, stop: int, start: int | None, past: Any) -> str | None:
    """The lean blocks against the bridge on the first two rows of a first input of this kind, unedited (the edits
    are the runner's own functions, applied alike): why not to use them, or None."""
    from wordpos.patching.edge_runner import position_error, route_tolerance
    from wordpos.probing.engines.split_inputs import PrefixKV

    n = min(2, int(x.shape[0]))
    pk = None if past is None else PrefixKV([k[:n] for k in past.keys], [v[:n] for v in past.values])
    ref, _ = engine.run(x[:n], stop_at_layer=stop, start_at_layer=start, past=pk)
    err, tol = position_error(_lean(blocks, x[:n], start, stop, pk), ref), route_tolerance(ref.dtype)
    return None if err <= tol else \
        f"the lean forward of head edits differs from the bridge's by {err:.2e} of a position's norm (> {tol:.0e})"


__all__ = ["ENABLED", "forced", "lean_run", "route_state"]
