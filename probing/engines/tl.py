"""The TransformerLens engine: :class:`~wordpos.probing.engines.base.Engine` over a ``TransformerBridge``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from wordpos.probing import hooks as H
from wordpos.probing.engines.base import HookFn, ModelDims
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
        )
        self.tokenizer = model.tokenizer
        self.device = torch.device(getattr(cfg, "device", None) or next(model.parameters()).device)
        from wordpos.probing.models import model_name

        self.name = model_name(model)

    def run(self, inputs, *, hooks=(), cache=(), stop_at_layer=None, start_at_layer=None):
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
        try:
            out = self.model.run_with_hooks(inputs, fwd_hooks=fwd, stop_at_layer=stop_at_layer,
                                            start_at_layer=start_at_layer)
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
