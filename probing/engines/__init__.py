"""The engine seam: one interface (:class:`Engine`) over TransformerLens (:class:`TLEngine`) and nnsight
(:class:`~wordpos.probing.engines.nnsight_engine.NNsightEngine`), and the per-architecture module table
(:mod:`~wordpos.probing.engines.archs`) the nnsight engine reads."""

from wordpos.probing.lazy import lazy_exports

# public names, imported from their submodules on first use (see probing.lazy)
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "base": ["Engine", "HookFn", "ModelDims", "as_engine", "make_engine"],
    "tl": ["TLEngine"],
})
