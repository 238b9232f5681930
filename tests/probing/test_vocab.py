"""The shipped default word list is exactly what the wordfreq package gives."""

import pytest

from wordpos.probing.vocab import SHIPPED_WORDS, frequent_words


def test_shipped_list_matches_wordfreq():
    wordfreq = pytest.importorskip("wordfreq")

    def ref(n):
        return [w for w in wordfreq.top_n_list("en", n) if w.isascii() and w.isalpha() and w.islower()]

    assert frequent_words() == ref(10_000)
    assert frequent_words(300) == ref(300)
    assert SHIPPED_WORDS.stat().st_size < 100_000


def test_other_languages_ask_wordfreq():
    pytest.importorskip("wordfreq")
    words = frequent_words(200, lang="fr")
    assert words and "the" not in words[:50]


def test_batched_memoised_word_tokens_equal_one_encode_per_word(gpt2_tok):
    """``words_tokens`` (one batch call, remembered per tokenizer) gives exactly what encoding each word alone gives,
    for GPT-2's byte-level BPE and a SentencePiece-style Llama tokenizer (SmolLM2's, shipped with the benchmarks)."""
    import gzip
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    from wordpos.probing.vocab import frequent_words, word_tokens, words_tokens

    bundle = Path(__file__).resolve().parents[2] / "scripts" / "bench_bundle" / "smollm2-135m"
    llama = PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(
        gzip.open(bundle / "tokenizer.json.gz", "rt", encoding="utf-8").read()))
    words = frequent_words(3000)[::7] + ["dramatisation", "naïve", "x", "antidisestablishmentarianism"]
    for tok in (gpt2_tok, llama):
        ref = [list(tok.encode(" " + w, add_special_tokens=False)) for w in words]
        assert words_tokens(tok, words) == ref  # first call: batch-encoded
        assert words_tokens(tok, words[::-1]) == ref[::-1]  # second: from the memo, in the order asked
        assert [word_tokens(tok, w) for w in words[:50]] == ref[:50]
        assert any(len(r) == 3 for r in ref) and any(len(r) == 1 for r in ref)
