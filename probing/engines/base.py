"""The engine seam: the few operations the pipeline needs from a model, behind one interface.

``Engine.run`` runs a batch of token ids (or a residual stream, with ``start_at_layer``) with a set of
forward hooks keyed by TransformerLens hook names (see :mod:`probing.hooks`), caches the named
activations, and stops after the residual stream that ``stop_at_layer`` names. ``TLEngine`` wraps a
TransformerLens ``TransformerBridge``; ``wordpos.probing.engines.nnsight_engine.NNsightEngine`` implements the same
operations with nnsight on the Hugging Face model, so activations and patching code are written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from wordpos.probing import heap
from wordpos.probing import hooks as H
from wordpos.probing.errors import ConfigError

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
    #: attention and MLP read the same residual (GPT-NeoX/Pythia, GPT-J, Phi, Falcon, ...): a layer's MLP does not
    #: see that layer's heads, so the edge graph has no head -> same-layer MLP edges
    parallel_attn_mlp: bool = False

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
        past: Any = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run ``inputs`` (token ids; or ``resid_pre`` of ``start_at_layer``) with ``hooks``.

        ``past`` (optional; engines without it refuse it, see
        :func:`~wordpos.probing.engines.split_inputs.prefix_kv_unsupported`): the keys/values of the positions
        before ``inputs`` (a ``PrefixKV`` with one row per input row), so ``inputs`` are the later positions only.
        (The nnsight engine also takes an empty Hugging Face cache there, which the forward fills: how
        :func:`~wordpos.probing.engines.split_inputs.cached_runs` keeps its keys/values; the TransformerLens engine
        gets that cache through the bridge instead.)

        Returns ``(out, cache)``: ``out`` is the residual stream before block ``stop_at_layer``
        (``blocks.{stop_at_layer}.hook_resid_pre``, or the final ``resid_post`` when it equals
        ``n_layers``), or the logits when ``stop_at_layer`` is None. ``cache`` maps each name in
        ``cache`` to its activation (after any hook on it). Gradients flow unless the caller
        disables them.
        """
        ...


@contextlib.contextmanager
def instance_overrides(objects: Sequence[Any], name: str, value_for: Callable[[Any], Any]) -> Iterator[None]:
    """Inside the block each of ``objects`` carries the instance attribute ``name = value_for(obj)``, which shadows
    its class's method of that name; the attributes are removed afterwards, also on error. How the engines change
    a bridge component's behaviour for one call without touching the class (or other models)."""
    objects = list(objects)
    try:
        for o in objects:
            o.__dict__[name] = value_for(o)
        yield
    finally:
        for o in objects:
            o.__dict__.pop(name, None)


def as_engine(model: Any) -> Engine:
    """Accept an ``Engine``, a ``TransformerBridge`` or an nnsight ``LanguageModel``."""
    if hasattr(model, "run") and hasattr(model, "dims"):
        return model
    if type(model).__name__ in ("LanguageModel", "TransformersModel"):
        from wordpos.probing.engines.nnsight_engine import NNsightEngine

        return NNsightEngine(model)
    if hasattr(model, "run_with_hooks") and hasattr(model, "cfg"):
        from wordpos.probing.engines.tl import TLEngine

        return TLEngine(model)
    raise TypeError(
        f"expected a TransformerBridge (from wordpos.probing.load_model), an nnsight LanguageModel or an Engine, "
        f"got {type(model).__name__}"
    )


def engine_dtype(engine: Any) -> torch.dtype | None:
    """The dtype of an engine's (or model's) weights, or None when it has none here (a remote model)."""
    module = getattr(engine, "model", engine)
    module = getattr(module, "_module", module)  # an nnsight wrapper: its Hugging Face model
    try:
        return next(p.dtype for p in module.parameters() if p.is_floating_point())
    except (AttributeError, StopIteration, TypeError):
        return None


def make_engine(model_or_name: Any, engine: str = "tl", device: str | None = None, remote: bool = False,
                dtype: torch.dtype | str | None = None) -> Engine:
    """An ``Engine`` from a model or a model name: ``engine="tl"`` (TransformerBridge via
    ``probing.load_model``) or ``"nnsight"`` (``NNsightEngine.from_model``: shares a bridge's weights,
    loads a directory / built-in / hub name, or with ``remote=True`` runs a hub model on NDIF).

    ``dtype`` (``"float32"`` default, ``"bfloat16"``, ``"float16"``) is the dtype a *name* is loaded in; an
    already-loaded model keeps its own, and a ``dtype`` that contradicts it is a ``ConfigError``."""
    from wordpos.probing.models.registry import check_device, resolve_dtype

    wanted = resolve_dtype(dtype) if dtype is not None else None
    if device is not None and not remote:  # before any loading: a device this machine lacks fails at once
        device = check_device(device)
    is_name = isinstance(model_or_name, (str, bytes)) or hasattr(model_or_name, "__fspath__")
    if engine == "nnsight":
        from wordpos.probing.engines.nnsight_engine import NNsightEngine

        if isinstance(model_or_name, NNsightEngine):
            out: Engine = model_or_name
        else:
            out = NNsightEngine.from_model(model_or_name, device=device, remote=remote, dtype=wanted)
    elif engine != "tl":
        raise ConfigError(f"engine {engine!r} is not one of 'tl', 'nnsight'.")
    elif remote:
        raise ConfigError("remote=True needs engine='nnsight' (TransformerLens runs locally only).")
    elif is_name:
        from wordpos.probing.models import load_model

        from wordpos.probing.engines.tl import TLEngine

        out = TLEngine(load_model(model_or_name, device=device, dtype=wanted))
    else:
        out = as_engine(model_or_name)
    have = engine_dtype(out)
    if wanted is not None and not is_name and have is not None and have != wanted:
        raise ConfigError(f"dtype={str(wanted).removeprefix('torch.')!r} was asked for, but the model passed in is "
                          f"already loaded in {str(have).removeprefix('torch.')}. Load it with that dtype "
                          "(load_model(name, dtype=...)) or pass the model name instead of the model.")
    heap.model_loaded()  # every engine, nnsight's too: the command line paused the garbage collector until now
    return out
