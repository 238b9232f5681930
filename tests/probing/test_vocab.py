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
