"""The engine seam: the few operations the pipeline needs from a model, behind one interface.

``Engine.run`` runs a batch of token ids (or a residual stream, with ``start_at_layer``) with a set of
forward hooks keyed by TransformerLens hook names (see :mod:`probing.hooks`), caches the named
activations, and stops after the residual stream that ``stop_at_layer`` names. ``TLEngine`` wraps a
TransformerLens ``TransformerBridge``; ``probing.engine_nnsight.NNsightEngine`` implements the same
operations with nnsight on the Hugging Face model, so activations and patching code are written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probing import hooks as H
from probing.errors import ConfigError

HookFn = Callable[[Tensor, str], "Tensor | None"]
"""A forward hook: receives the activation and its canonical hook name, returns a replacement (or
``None`` to keep it). Shapes follow TransformerLens: ``hook_z`` is ``[batch, pos, head, d_head]``."""


@dataclass(frozen=True)
class ModelDims:
    """The sizes every module needs, independent of the engine."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    d_vocab: int

    def check_layer(self, layer: int, what: str = "layer") -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ConfigError(
                f"{what} {layer!r} is out of range: this model has {self.n_layers} layers, "
                f"so use 0..{self.n_layers - 1}."
            )
        return layer

    def check_head(self, layer: int, head: int) -> tuple[int, int]:
        self.check_layer(layer, "head layer")
        if not 0 <= head < self.n_heads:
            raise ConfigError(
                f"head {layer}.{head} is out of range: layer {layer} has {self.n_heads} heads "
                f"(0..{self.n_heads - 1})."
            )
        return layer, head


class _Stop(Exception):
    def __init__(self, value: Tensor):
        self.value = value


@runtime_checkable
class Engine(Protocol):
    """What the pipeline asks of a model."""

    dims: ModelDims
    tokenizer: Any
    device: torch.device
    name: str

    def run(
        self,
        inputs: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
        *,
        hooks: Sequence[tuple[str, HookFn]] = (),
        cache: Sequence[str] = (),
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run ``inputs`` (token ids; or ``resid_pre`` of ``start_at_layer``) with ``hooks``.

        Returns ``(out, cache)``: ``out`` is the residual stream before block ``stop_at_layer``
        (``blocks.{stop_at_layer}.hook_resid_pre``, or the final ``resid_post`` when it equals
        ``n_layers``), or the logits when ``stop_at_layer`` is None. ``cache`` maps each name in
        ``cache`` to its activation (after any hook on it). Gradients flow unless the caller
        disables them.
        """
        ...


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
        from probing.models import model_name

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


def as_engine(model: Any) -> Engine:
    """Accept an ``Engine``, a ``TransformerBridge`` or an nnsight ``LanguageModel``."""
    if isinstance(model, (TLEngine,)) or (hasattr(model, "run") and hasattr(model, "dims")):
        return model
    if type(model).__name__ in ("LanguageModel", "TransformersModel"):
        from probing.engine_nnsight import NNsightEngine

        return NNsightEngine(model)
    if hasattr(model, "run_with_hooks") and hasattr(model, "cfg"):
        return TLEngine(model)
    raise TypeError(
        f"expected a TransformerBridge (from probing.load_model), an nnsight LanguageModel or an Engine, "
        f"got {type(model).__name__}"
    )


def make_engine(model_or_name: Any, engine: str = "tl", device: str | None = None, remote: bool = False) -> Engine:
    """An ``Engine`` from a model or a model name: ``engine="tl"`` (TransformerBridge via
    ``probing.load_model``) or ``"nnsight"`` (``NNsightEngine.from_model``: shares a bridge's weights,
    loads a directory / built-in / hub name, or with ``remote=True`` runs a hub model on NDIF)."""
    if engine == "nnsight":
        from probing.engine_nnsight import NNsightEngine

        if isinstance(model_or_name, NNsightEngine):
            return model_or_name
        return NNsightEngine.from_model(model_or_name, device=device, remote=remote)
    if engine != "tl":
        raise ConfigError(f"engine {engine!r} is not one of 'tl', 'nnsight'.")
    if remote:
        raise ConfigError("remote=True needs engine='nnsight' (TransformerLens runs locally only).")
    if isinstance(model_or_name, (str, bytes)) or hasattr(model_or_name, "__fspath__"):
        from probing.models import load_model

        return TLEngine(load_model(model_or_name, device=device))
    return as_engine(model_or_name)
