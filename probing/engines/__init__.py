"""The engine seam: one interface (:class:`Engine`) over TransformerLens (:class:`TLEngine`) and nnsight
(:class:`~wordpos.probing.engines.nnsight_engine.NNsightEngine`), and the per-architecture module table
(:mod:`~wordpos.probing.engines.archs`) the nnsight engine reads."""

from wordpos.probing.engines.base import Engine, HookFn, ModelDims, as_engine, make_engine
from wordpos.probing.engines.tl import TLEngine

__all__ = ["Engine", "HookFn", "ModelDims", "TLEngine", "as_engine", "make_engine"]
