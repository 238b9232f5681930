"""The TransformerLens engine: :class:`~wordpos.probing.engines.base.Engine` over a ``TransformerBridge``.

Two things make its patched forwards cost only what they change:

* ``start_at_layer=k`` *skips* blocks ``0..k-1``. TransformerLens 4.3's bridge runs them on the injected residual
  and throws their output away (its docstring says so); here they return their input untouched for the duration
  of the call, so a patch at layer k costs ``stop - k`` layers, as with ``HookedTransformer``.
* ``past=`` (a :class:`~wordpos.probing.engines.split_inputs.PrefixKV`) runs ``inputs`` as the positions *after*
  a cached prefix: the prefix's keys and values come from an earlier run, positions (RoPE, GPT-2's position
  embeddings) continue from the prefix's length, and hooks see the new positions only. Causal attention makes
  this exact when the prefix's activations are the ones the full run would compute.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from wordpos.probing import hooks as H
from wordpos.probing.engines.base import HookFn, ModelDims, instance_overrides
from wordpos.probing.errors import ConfigError


class _Stop(Exception):
    def __init__(self, value: Tensor):
        self.value = value



class TLEngine:
    """The TransformerLens implementation, over a ``TransformerBridge``."""

    def __init__(self, model: Any):
        self.model = model
        cfg = model.cfg
        self.dims = ModelDims(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
            d_model=cfg.d_model,
            d_head=cfg.d_head,
            n_ctx=cfg.n_ctx,
            d_vocab=cfg.d_vocab,
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
        )
        self.tokenizer = model.tokenizer
        self.device = torch.device(getattr(cfg, "device", None) or next(model.parameters()).device)
        from wordpos.probing.models import model_name

        self.name = model_name(model)

    def run(self, inputs, *, hooks=(), cache=(), stop_at_layer=None, start_at_layer=None, past=None):
        store: dict[str, Tensor] = {}
        fwd: list[tuple[str, Callable]] = []
        for name, fn in hooks:
            fwd.append((name, _tl_hook(name, fn)))
        for name in cache:
            fwd.append((name, _tl_store(name, store)))
        n = self.dims.n_layers
        final = None
        if stop_at_layer is not None:
            if not 0 <= stop_at_layer <= n:
                raise ConfigError(f"stop_at_layer={stop_at_layer} is out of range 0..{n}.")
            if stop_at_layer == n:
                # TransformerBridge treats stop_at_layer == n_layers as "run to the logits"; stop by hand
                # after the last block instead so the unembedding is never computed.
                final = H.resid(n - 1, "resid_post")
                fwd.append((final, _tl_stop))
                stop_at_layer = None
        kw: dict[str, Any] = {}
        ctx: contextlib.ExitStack = contextlib.ExitStack()
        if past is not None:
            from wordpos.probing.engines.split_inputs import PAST_DEPRECATED, kv_cache_passthrough

            kw["past_key_values"] = past.cache_for(inputs)
            ctx.enter_context(kv_cache_passthrough(self))
            ctx.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=PAST_DEPRECATED)
        if start_at_layer:
            ctx.enter_context(skip_blocks(self.model, start_at_layer))
        with ctx:
            try:
                out = self.model.run_with_hooks(inputs, fwd_hooks=fwd, stop_at_layer=stop_at_layer,
                                                start_at_layer=start_at_layer, **kw)
            except _Stop as s:
                out = s.value
        if stop_at_layer is not None and stop_at_layer < n:
            # the residual that stop_at_layer returns *is* resid_pre of that block, whose hook never fires
            edge = H.resid(stop_at_layer, "resid_pre")
            if edge in cache and edge not in store:
                store[edge] = out
        if final is None and stop_at_layer is None and out.shape[-1] != self.dims.d_vocab:
            raise RuntimeError("expected logits from a full forward pass")
        return out, store


def _passthrough(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden_states


@contextlib.contextmanager
def skip_blocks(model: Any, n: int) -> Iterator[None]:
    """Inside the block, blocks ``0..n-1`` of the bridge return their input hidden states without computing
    anything (an instance-level ``forward``, removed afterwards, also on error). Used under ``start_at_layer=n``,
    where the bridge replaces block n's input with the caller's residual anyway."""
    with instance_overrides(list(model.blocks)[:n], "forward", lambda _block: _passthrough):
        yield


def _tl_hook(name: str, fn: HookFn):
    def hook(act, hook):
        new = fn(act, name)
        return act if new is None else new

    return hook


def _tl_store(name: str, store: dict[str, Tensor]):
    def hook(act, hook):
        store[name] = act
        return act

    return hook


def _tl_stop(act, hook):
    raise _Stop(act)
