"""Per-reader inputs for edge-level interventions, for each engine, in one place.

Edge patching needs to change the input of one reader (one head's query, one key/value head's key or value,
one MLP) without changing the others. TransformerLens' ``TransformerBridge`` provides this when asked:
``set_use_split_qkv_input(True)`` forks the residual stream before ``ln1`` into
``blocks.L.attn.hook_{q,k,v}_input`` (``[batch, pos, n_heads | n_kv_heads, d_model]``; with grouped-query
attention k/v have one slot per key/value head), and ``set_use_hook_mlp_in(True)`` exposes the MLP's input
before ``ln2`` as ``blocks.L.hook_mlp_in``. Both slow the forward down, so :func:`split_reader_inputs` turns
them on only inside a ``with`` block. :func:`head_out_weights` returns each head's ``W_O`` so a head's own
write to the residual stream is ``z_h @ W_O[h]``.

:func:`run_prefix` / :func:`run_suffix` let edge-level forwards compute a prompt prefix shared by every run once:
the prefix's keys/values go into a Hugging Face ``DynamicCache`` that each suffix run extends (positions come
from the cache length, so RoPE and GPT-2 position embeddings line up). :func:`prefix_kv_unsupported` says why an
engine cannot.

The nnsight engine does not provide split reader inputs yet (it would need the per-head fork and norm
inside the attention module); asking for them raises a :class:`ConfigError` that says so.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from wordpos.probing.engines.base import instance_overrides
from wordpos.probing.errors import ConfigError

ReaderSite = Literal["q", "k", "v", "mlp"]
PAST_DEPRECATED = ".*past_key_values.*deprecated.*"
"""transformers >= 5 warns that ``past_key_values`` is a deprecated alias of ``cache``; both engines pass it (nnsight
builds no attention mask beside it), so its warning is silenced around those calls."""


def reader_hook(layer: int, site: ReaderSite) -> str:
    """TransformerLens name of a split reader input: ``blocks.L.attn.hook_{q,k,v}_input`` or ``blocks.L.hook_mlp_in``."""
    if site == "mlp":
        return f"blocks.{layer}.hook_mlp_in"
    if site not in ("q", "k", "v"):
        raise ConfigError(f"reader site must be 'q', 'k', 'v' or 'mlp', got {site!r}.")
    return f"blocks.{layer}.attn.hook_{site}_input"


def _bridge(engine: Any) -> Any:
    model = getattr(engine, "model", None)
    if model is not None and hasattr(model, "set_use_split_qkv_input") and hasattr(model, "set_use_hook_mlp_in"):
        return model
    raise ConfigError(
        f"split reader inputs (per-head q/k/v and MLP inputs, for edge-level patching) are supported on the "
        f"TransformerLens engine only; got {type(engine).__name__}. Use make_engine(model, engine='tl')."
    )


@contextlib.contextmanager
def split_reader_inputs(engine: Any) -> Iterator[None]:
    """Inside the block the engine exposes ``reader_hook(L, site)`` for every layer; the old settings come back
    after it (also on error)."""
    bridge = _bridge(engine)
    cfg = bridge.cfg
    old = (bool(getattr(cfg, "use_split_qkv_input", False)), bool(getattr(cfg, "use_hook_mlp_in", False)))
    try:
        why = _enable_fork(bridge)
        if why is not None:
            raise ConfigError(f"{why}. Use the head-level circuit instead (wordpos run --circuit heads).")
        yield
    finally:
        bridge.set_use_split_qkv_input(old[0])
        bridge.set_use_hook_mlp_in(old[1])


def _enable_fork(bridge: Any) -> str | None:
    """Turn on the bridge's per-head q/k/v fork and MLP-input hook; why it cannot (None when it did). The caller
    restores the settings."""
    try:
        bridge.set_use_split_qkv_input(True)
        bridge.set_use_hook_mlp_in(True)
    except NotImplementedError as e:  # TransformerLens has no per-head fork for this attention (GPT-J, ...)
        arch = getattr(bridge.cfg, "architecture", None) or "this architecture"
        return (f"edge-level patching needs per-head q/k/v reader inputs, which TransformerLens' bridge does not "
                f"offer for {arch} ({str(e).split('. ')[0]})")
    return None


def split_inputs_unsupported(engine: Any) -> str | None:
    """Why edge-level interventions cannot run on this engine's model, or would be wrong there (None when they are
    right): the bridge must give per-reader inputs (:func:`split_reader_inputs`) and the model must be a sum of its
    writers (:func:`writer_sum_mismatch`). Checked before an edge circuit runs anything; cached per model."""
    try:
        bridge = _bridge(engine)
    except ConfigError:
        return (f"edge-level patching needs per-head q/k/v and MLP reader inputs, which the TransformerLens engine "
                f"gives (make_engine(model, engine='tl')) and {type(engine).__name__} does not")
    if bridge in _CHECKED:
        return _CHECKED[bridge]
    old = (bool(getattr(bridge.cfg, "use_split_qkv_input", False)), bool(getattr(bridge.cfg, "use_hook_mlp_in", False)))
    try:
        reason = _enable_fork(bridge)
    finally:
        bridge.set_use_split_qkv_input(old[0])
        bridge.set_use_hook_mlp_in(old[1])
    if reason is None:
        reason = writer_sum_mismatch(engine)
    if isinstance(reason, _CheckFailed):
        return str(reason)
    _CHECKED[bridge] = reason
    return reason


_CHECKED: "weakref.WeakKeyDictionary[Any, str | None]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def writer_sum_mismatch(engine: Any, n_layers: int | None = None) -> str | None:
    """Why this model's residual stream is not the sum the edge graph assumes (None when it is), on two short random
    prompts: every reader input the bridge exposes must be the residual stream that reader reads, up to a constant
    (q/k/v: the layer's input; the MLP: the layer's input plus its heads' writes ``z_h · W_O[h]``, or the layer's input
    alone where attention and MLP run in parallel), each layer's output must be its input plus its heads' writes and
    its MLP's output, up to a constant (the biases), and every norm of a decoder layer must read the residual stream
    (the layer's input or the MLP's), not a branch. Edge patching subtracts writers' outputs from reader inputs, which
    is only right then; a model that normalises a branch before adding it (Gemma 2's, GLM-4's and OLMo 2's post-norms)
    or feeds its MLP a normalised input (Phi's shared norm) fails here instead of giving wrong circuits.

    Each position is measured against its own scale (the largest entry of the terms summed there), so a few huge
    activations elsewhere do not loosen the bound: 1e-4 in float32/float64 (SmolLM2-135M: 4e-7), 3e-2 in half
    precision (SmolLM2-135M in bfloat16: 8.5e-3). A norm's input is the residual itself (no arithmetic), so that part
    is exact in any precision, where a small post-norm under a large residual would hide in the sums' rounding."""
    from wordpos.probing import hooks as H

    dims = engine.dims
    n = dims.n_layers if n_layers is None else n_layers
    arch = getattr(getattr(engine.model, "cfg", None), "architecture", None) or "this model"
    blocks = engine.model.blocks
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, dims.d_vocab, (2, 8), generator=g).to(engine.device)
    names = []
    for L in range(n):
        names += [H.resid(L, "resid_pre"), H.resid(L, "resid_post"), H.attn_z(L), H.mlp_out(L),
                  reader_hook(L, "q"), reader_hook(L, "k"), reader_hook(L, "v"), reader_hook(L, "mlp")]
    norm_in: list[dict[str, Tensor]] = [{} for _ in range(n)]  # per layer: norm's name in its layer -> what it read
    handles = []
    for L in range(n):
        layer = getattr(blocks[L], "original_component", blocks[L])
        for name, child in layer.named_children():
            if "norm" in type(child).__name__.lower():
                handles.append(child.register_forward_pre_hook(
                    lambda _m, args, seen=norm_in[L], name=name: seen.setdefault(name, args[0].detach().clone())
                    if args and isinstance(args[0], Tensor) else None))
    try:
        with split_reader_inputs(engine):
            _, c = engine.run(tokens, cache=names)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the check's forward is a reason not to patch edges
        return _post_mlp_norm(blocks[:n], arch) or _CheckFailed(
            f"edge-level patching's check could not run {arch} with per-reader inputs "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    finally:
        for h in handles:
            h.remove()
    silent = [x for x in names if x not in c]
    if silent:  # a reader whose hook exists but never fires would silently never be patched
        return (f"edge-level patching reads and patches {silent[0]}, which TransformerLens' bridge for {arch} does "
                f"not run" + (f" ({len(silent)} such hooks)" if len(silent) > 1 else ""))
    half = blocks[0].attn.W_O.dtype not in (torch.float32, torch.float64)
    tol = 3e-2 if half else 1e-4
    prefix = f"edge-level patching assumes a residual stream that is the sum of its writers, and {arch} breaks it: "
    for L in range(n):  # (one layer at a time in float64)
        d = {k: c[k].detach().double() for k in names[8 * L:8 * L + 8]}
        pre, post, mlp_out = d[H.resid(L, "resid_pre")], d[H.resid(L, "resid_post")], d[H.mlp_out(L)]
        mlp_read = d[reader_hook(L, "mlp")]
        heads = torch.einsum("btha,had->btd", d[H.attn_z(L)], blocks[L].attn.W_O.detach().double())
        # each position's own scale: the largest entry of the terms summed there
        scale = torch.stack([t.abs().amax(-1) for t in (pre, post, heads, mlp_out, mlp_read)]).amax(0) + 1e-6
        mlp_in = pre if dims.parallel_attn_mlp else pre + heads
        mlp_expected = "the layer's input" if dims.parallel_attn_mlp else "the layer's input plus its heads' writes"
        checks = [(f"the q/k/v inputs of layer {L}'s heads", "the layer's input",
                   (d[reader_hook(L, x)] - pre[:, :, None]).flatten(2)) for x in ("q", "k", "v")]
        checks += [(f"layer {L}'s MLP input", mlp_expected, mlp_read - mlp_in),
                   (f"layer {L}'s output", "its input plus its heads' writes and its MLP's output",
                    post - pre - heads - mlp_out)]
        ref = int(scale.flatten().argmin())  # the biases, read where rounding is smallest (not at a huge activation)
        for what, expected, x in checks:
            # off that constant, relative to each position's scale
            off = float(((x - x.flatten(0, 1)[ref]).abs().amax(-1) / scale).max())
            if not off <= tol:  # (NaN fails too)
                return (prefix + f"{what} is not {expected} (up to a bias; off by {off:.3g} of the residual's scale "
                        f"at a position, bound {tol:g})")
        for name, x in norm_in[L].items():
            x = x.double()
            if x.shape[:2] != pre.shape[:2]:
                continue  # (not a [batch, pos, ...] residual: nothing to compare)
            x = x.flatten(2, -2) if x.dim() > 4 else x
            if x.dim() == 4:  # a per-head fork of the residual: [batch, pos, slot, d]
                rel = [((x - r[:, :, None]).abs().amax((-2, -1)) / scale).max() for r in (pre, mlp_read)]
            elif x.shape[-1] == pre.shape[-1]:
                rel = [((x - r).abs().amax(-1) / scale).max() for r in (pre, mlp_read)]
            else:
                continue
            off = float(min(rel))
            if not off <= tol:
                return (prefix + f"layer {L}'s {name} normalises a branch, not the residual stream (its input is "
                        f"neither the layer's input nor the MLP's: off by {off:.3g} of the residual's scale)")
    return _post_mlp_norm(blocks[:n], arch)


class _CheckFailed(str):
    """A reason from a check that could not run (not cached: it may be transient, e.g. out of memory)."""


def _post_mlp_norm(blocks: Any, arch: str) -> str | None:
    """Decoder layers with a norm after their MLP (``post_feedforward_layernorm``: Gemma 2/3, OLMo 2), by name: the
    norm-input check above may not see it when the bridge runs that norm in its own code."""
    for b in blocks:
        layer = getattr(b, "original_component", b)
        if getattr(layer, "post_feedforward_layernorm", None) is not None:
            return (f"edge-level patching assumes a residual stream that is the sum of its writers, and {arch} "
                    f"normalises each branch before adding it ({type(layer).__name__}.post_feedforward_layernorm)")
    return None


def head_out_weights(engine: Any, layers: int | None = None) -> Float[Tensor, "layer head d_head d_model"]:
    """``W_O`` of every head of the first ``layers`` layers (all by default), as the engine's ``hook_z`` sees it,
    so that head h's write is ``einsum(z[..., h, :], W_O[L, h])`` (the output bias is not a head's)."""
    n = engine.dims.n_layers if layers is None else layers
    model = getattr(engine, "model", None)
    blocks = getattr(model, "blocks", None)
    if blocks is not None and hasattr(blocks[0].attn, "W_O"):
        return torch.stack([blocks[L].attn.W_O for L in range(n)]).detach()
    raise ConfigError(f"cannot find the heads' output weights W_O on {type(engine).__name__}; use the "
                      "TransformerLens engine (make_engine(model, engine='tl')).")


# ---------------------------------------------------------------------------- shared-prefix keys/values
class _Stop(Exception):
    def __init__(self, value: Tensor):
        self.value = value


def prefix_kv_unsupported(engine: Any) -> str | None:
    """Why this engine cannot run a prompt's suffix on top of cached prefix keys/values (None when it can).

    The route needs a decoder-only Hugging Face model that extends a ``DynamicCache``: under a ``TransformerBridge``
    whose attention bridges extend it (``_update_kv_cache``), or wrapped by nnsight and run locally (the model's own
    forward takes the cache)."""
    try:
        from transformers import DynamicCache  # noqa: F401
    except ImportError:  # pragma: no cover - transformers always ships it
        return "transformers has no DynamicCache"
    if _is_nnsight(engine):
        if engine.remote:
            return "a remote (NDIF) model is not sent cached keys/values"
        hf_model = getattr(engine.model, "_module", None)
    else:
        model = getattr(engine, "model", None)
        blocks = getattr(model, "blocks", None)
        if model is None or blocks is None or not hasattr(model, "run_with_hooks"):
            return (f"{type(engine).__name__} is neither the TransformerLens nor the nnsight engine (prefix "
                    "keys/values need a TransformerBridge or a local nnsight model)")
        if not all(hasattr(b, "attn") and hasattr(b.attn, "_update_kv_cache") for b in blocks):
            return "this bridge's attention components do not extend a key/value cache"
        hf_model = getattr(model, "original_model", None)
    if bool(getattr(getattr(hf_model, "config", None), "is_encoder_decoder", False)):
        return "encoder-decoder models are not supported"
    return None


def _is_nnsight(engine: Any) -> bool:
    from wordpos.probing.engines.nnsight_engine import NNsightEngine

    return isinstance(engine, NNsightEngine)


@contextlib.contextmanager
def kv_cache_passthrough(engine: Any) -> Iterator[None]:
    """Let the bridge's attention components see the Hugging Face cache.

    transformers >= 5 hands a decoder layer's cache to its attention as ``cache=`` (``past_key_values`` is a
    deprecated alias), while TransformerLens 4.3's attention bridges look only for ``past_key_values`` /
    ``layer_past`` and so silently skip the cache. Inside the block each attention bridge's ``_update_kv_cache``
    (an instance attribute, removed afterwards) also accepts ``cache=``."""
    def accepting_cache(attn: Any) -> Callable[..., tuple[Tensor, Tensor]]:
        orig = type(attn)._update_kv_cache.__get__(attn)

        def update(k: Tensor, v: Tensor, **kw: Any) -> tuple[Tensor, Tensor]:
            if kw.get("past_key_values") is None and kw.get("layer_past") is None and kw.get("cache") is not None:
                kw["past_key_values"] = kw["cache"]
            return orig(k, v, **kw)

        return update

    if _is_nnsight(engine):  # the Hugging Face model's own attention takes the cache
        yield
        return
    with instance_overrides([b.attn for b in engine.model.blocks], "_update_kv_cache", accepting_cache):
        yield


def _stacked(t: Tensor, repeat: int) -> Tensor:
    """``repeat`` copies of ``t``'s rows stacked as ``(r b)``, the runner's intervention-major batch."""
    return einops.repeat(t, "b h t d -> (r b) h t d", r=repeat) if repeat > 1 else t


@dataclass
class PrefixKV:
    """Keys and values of the first ``length`` positions of ``rows`` prompts, for layers ``0..n_layers-1``
    (each ``[rows, n_kv_heads, length, d_head]``), and the residual stream the run stopped at there."""

    keys: list[Tensor]
    values: list[Tensor]
    resid: Tensor | None = None  # [rows, length, d_model]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2])

    @property
    def rows(self) -> int:
        return int(self.keys[0].shape[0])

    def select(self, rows: slice | Tensor, length: int, repeat: int = 1, n_rows: int | None = None) -> "PrefixKV":
        """The first ``length`` positions of ``rows``, stacked ``repeat`` times (rows ``(r b)``, the runner's
        intervention-major batch). A one-row cache (a prefix every prompt shares) is broadcast to ``n_rows``."""
        if length > self.length:
            raise ConfigError(f"a prefix of {length} positions was asked of a cache holding {self.length}.")

        def cut(t: Tensor) -> Tensor:
            if self.rows == 1 and n_rows is not None:
                return t[:, :, :length].expand(n_rows * repeat, -1, -1, -1)
            return _stacked(t[rows, :, :length], repeat)

        return PrefixKV([cut(k) for k in self.keys], [cut(v) for v in self.values])

    def cache_for(self, inputs: Tensor) -> Any:
        """:meth:`cache` for a forward of ``inputs`` (one row per prefix row), refusing any other row count."""
        if self.rows != int(inputs.shape[0]):
            raise ConfigError(f"the cached prefix holds {self.rows} rows but the inputs have {inputs.shape[0]}.")
        return self.cache(1)

    def cache(self, repeat: int) -> Any:
        """A fresh Hugging Face cache holding the prefix of ``repeat`` stacked copies of the rows (rows ``(r b)``);
        a forward extends it in place, so each forward needs its own."""
        from transformers import DynamicCache

        c = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            c.update(_stacked(k, repeat), _stacked(v, repeat), i)
        return c


def _bridge_run(engine: Any, tokens: Tensor, hooks: Sequence[tuple[str, Callable]], stop_at_layer: int,
                cache: Any) -> Tensor:
    """``blocks.{stop_at_layer}.hook_resid_pre`` (or the last ``resid_post``) of ``tokens`` on top of ``cache`` (a
    Hugging Face cache the forward extends). The nnsight engine's ``run`` takes the cache itself."""
    if _is_nnsight(engine):
        return engine.run(tokens, hooks=hooks, stop_at_layer=stop_at_layer, past=cache)[0]
    model = engine.model
    n = len(model.blocks)

    def wrap(fn: Callable) -> Callable:
        def hook(act: Tensor, hook: Any) -> Tensor:
            new = fn(act, hook.name)
            return act if new is None else new
        return hook

    def stop(act: Tensor, hook: Any) -> None:
        raise _Stop(act)

    fwd = [(name, wrap(fn)) for name, fn in hooks]
    stop_at: int | None = stop_at_layer
    if stop_at_layer == n:
        fwd.append((f"blocks.{n - 1}.hook_resid_post", stop))
        stop_at = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PAST_DEPRECATED)
        try:
            return model.run_with_hooks(tokens, fwd_hooks=fwd, stop_at_layer=stop_at, past_key_values=cache)
        except _Stop as s:
            return s.value


def run_prefix(engine: Any, tokens: Int[Tensor, "rows prefix"], stop_at_layer: int, *, split: bool = True) -> PrefixKV:
    """Run the prefix tokens once and keep their keys and values for the layers below ``stop_at_layer`` (with
    ``split``, split reader inputs on, as the edge runner's patched forwards run; without, as a plain forward):
    :func:`cached_runs` of one group in one forward."""
    with split_reader_inputs(engine) if split else contextlib.nullcontext():
        _, _, prefix = cached_runs(engine, [tokens], (), stop_at_layer, tokens.shape[0], kv_group=0)
    return prefix


def cached_runs(engine: Any, groups: Sequence[Int[Tensor, "rows pos"]], names: Sequence[str], stop_at_layer: int,
                rows_per_forward: int, *, keep: Sequence[Sequence[str]] | None = None, kv_group: int | None = None
                ) -> tuple[list[Tensor], list[dict[str, Tensor]], PrefixKV | None]:
    """Plain forwards of several prompt groups (same length) stacked in one batch, ``rows_per_forward`` rows at a
    time: per group its residual before block ``stop_at_layer`` and its activations at ``keep[g]`` (default: all
    ``names``), and the keys/values of group ``kv_group`` at every position (as :func:`run_prefix` keeps them).
    One forward where a context needs a clean run, a corrupted run and the base run's keys/values (``prepare``):
    on an accelerator each forward's cost is mostly launches."""
    from transformers import DynamicCache

    groups = [g.to(engine.device) for g in groups]
    keep = [list(names)] * len(groups) if keep is None else [list(k) for k in keep]
    bounds = [0]
    for g in groups:
        bounds.append(bounds[-1] + g.shape[0])
    tokens = torch.cat(groups)
    outs: list[list[Tensor]] = [[] for _ in groups]
    caches: list[dict[str, list[Tensor]]] = [{n: [] for n in k} for k in keep]
    keys: list[list[Tensor]] = [[] for _ in range(stop_at_layer)]
    values: list[list[Tensor]] = [[] for _ in range(stop_at_layer)]
    per = max(1, int(rows_per_forward))
    for s in range(0, bounds[-1], per):
        e = min(bounds[-1], s + per)
        store: dict[str, Tensor] = {}
        hooks = [(n, lambda act, _n, n=n: store.__setitem__(n, act)) for n in names]
        kv = None
        if kv_group is not None and s < bounds[kv_group + 1] and e > bounds[kv_group]:
            kv = DynamicCache()
        with (kv_cache_passthrough(engine) if kv is not None else contextlib.nullcontext()), torch.no_grad():
            out = _bridge_run(engine, tokens[s:e], hooks, stop_at_layer, kv)
        for gi in range(len(groups)):
            a, b = max(s, bounds[gi]), min(e, bounds[gi + 1])
            if a >= b:
                continue
            loc = slice(a - s, b - s)
            outs[gi].append(out[loc])
            for n in keep[gi]:
                caches[gi][n].append(store[n][loc])
            if gi == kv_group:
                layers = kv.layers[:stop_at_layer]
                if len(layers) < stop_at_layer or any(getattr(l, "keys", None) is None for l in layers):
                    raise ConfigError(f"{type(engine).__name__}'s model did not fill the key/value cache for every "
                                      "layer below the stop layer.")
                for L, l in enumerate(layers):
                    keys[L].append(l.keys[loc])
                    values[L].append(l.values[loc])

    def cat(xs: list[Tensor], own: bool = False) -> Tensor:
        """The pieces as one tensor; ``own``: never a view of a forward's whole batch (whose other rows are not
        kept), so that batch can be freed."""
        if len(xs) > 1:
            return torch.cat(xs)
        return xs[0].clone() if own and xs[0].shape[0] < tokens.shape[0] else xs[0]

    shared = set.intersection(*(set(k) for k in keep)) if keep else set()
    prefix = None
    if kv_group is not None:
        prefix = PrefixKV([cat(k, True) for k in keys], [cat(v, True) for v in values], cat(outs[kv_group]))
    return ([cat(o) for o in outs], [{n: cat(v, n not in shared) for n, v in c.items()} for c in caches], prefix)


def run_suffix(engine: Any, tokens: Int[Tensor, "rows suffix"], prefix: PrefixKV, repeat: int,
               hooks: Sequence[tuple[str, Callable]], stop_at_layer: int) -> Float[Tensor, "rows suffix d_model"]:
    """The residual stream before block ``stop_at_layer`` at the suffix positions of ``tokens`` (rows ``(r b)``:
    ``repeat`` copies of the prefix's rows), attending to the cached prefix. Hooks see suffix positions only.
    Call inside :func:`split_reader_inputs` when the hooks need the split reader inputs."""
    if tokens.shape[0] != repeat * prefix.keys[0].shape[0]:
        raise ConfigError(f"{tokens.shape[0]} suffix rows do not match {repeat} copies of the "
                          f"{prefix.keys[0].shape[0]} prefix rows.")
    with kv_cache_passthrough(engine):
        return _bridge_run(engine, tokens, hooks, stop_at_layer, prefix.cache(repeat))
