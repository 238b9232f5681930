"""The word vocabulary of the experiment: frequent lowercase English words, grouped by how many tokens
they take *in the model's own tokenizer* (with their leading space), split into train and held-out words.

The split is made within each token-length group so that held-out prompts sample lengths exactly as
training prompts do.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from wordpos.probing.errors import ConfigError, TokenizationError
from wordpos.probing.reprs import short_repr


SHIPPED_WORDS = Path(__file__).parent / "data" / "wordfreq_en_top10000.txt"
"""``wordfreq.top_n_list("en", 10000)`` (wordfreq 3.1.1), saved with the package so the default vocabulary is the
same on every machine and needs no 57 MB word-frequency package (e.g. on an offline GPU machine)."""


def frequent_words(n: int = 10_000, lang: str = "en") -> list[str]:
    """The ``n`` most frequent words of ``wordfreq`` that are lowercase, ASCII and alphabetic.

    English up to 10,000 words comes from the shipped list; anything else asks the ``wordfreq`` package."""
    if lang == "en" and n <= 10_000:
        lines = SHIPPED_WORDS.read_text(encoding="utf-8").splitlines()
        top = [w for w in lines if w and not w.startswith("#")][:n]
    else:
        try:
            import wordfreq
        except ImportError as e:  # pragma: no cover - wordfreq is a dependency
            raise ConfigError(f"frequent_words(n={n}, lang={lang!r}) needs the wordfreq package: pip install "
                              "wordfreq (the shipped list covers English up to 10,000 words).") from e
        top = wordfreq.top_n_list(lang, n)
    return [w for w in top if w.isascii() and w.isalpha() and w.islower()]


def word_tokens(tokenizer: Any, word: str) -> list[int]:
    """Token ids of ``word`` as it appears mid-sentence: with one leading space."""
    return words_tokens(tokenizer, [word])[0]


_TOKENIZER_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_memo(tokenizer: Any) -> dict[str, Any]:
    """A dict that lives as long as ``tokenizer``, for what is computed from its vocabulary once (word token ids,
    token classes); a fresh empty dict, so nothing is remembered, when it cannot be weakly referenced."""
    try:
        return _TOKENIZER_MEMO.setdefault(tokenizer, {})
    except TypeError:
        return {}


def words_tokens(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """:func:`word_tokens` of every word: new words are encoded in one batch call (a fast Hugging Face tokenizer)
    and remembered per tokenizer, since a run's vocabulary and each of its datasets tokenise the same words."""
    memo = tokenizer_memo(tokenizer).setdefault("word_ids", {})
    todo = [w for w in dict.fromkeys(words) if w not in memo]
    if todo:
        if getattr(tokenizer, "is_fast", False) and callable(tokenizer):
            ids = tokenizer([" " + w for w in todo], add_special_tokens=False)["input_ids"]
        else:
            ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in todo]
        memo.update(zip(todo, (tuple(int(i) for i in x) for x in ids)))
    return [list(memo[w]) for w in words]


@dataclass
class WordVocab:
    """Words keyed by token length, split into ``train`` and ``test`` (held-out) words."""

    train: dict[int, list[str]]
    test: dict[int, list[str]]
    seed: int = 0
    source: str = "wordfreq top-10000 en, lowercase alphabetic"
    lengths: tuple[int, ...] = field(default=(1, 2, 3))

    @classmethod
    def build(cls, tokenizer: Any, words: Sequence[str] | None = None, *, lengths: Sequence[int] = (1, 2, 3),
              test_fraction: float = 0.2, seed: int = 0) -> "WordVocab":
        """Group ``words`` (default: :func:`frequent_words`) by token count and split each group."""
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        words = list(frequent_words() if words is None else words)
        if not words:
            raise ConfigError("the word list is empty: pass at least one word per token length "
                              f"{tuple(lengths)} (or leave words=None for the default vocabulary).")
        lengths = tuple(sorted(set(int(n) for n in lengths)))
        groups: dict[int, list[str]] = {n: [] for n in lengths}
        unique = list(dict.fromkeys(words))
        for w, ids in zip(unique, words_tokens(tokenizer, unique)):
            if len(ids) in groups:
                groups[len(ids)].append(w)
        rng = random.Random(seed)
        train: dict[int, list[str]] = {}
        test: dict[int, list[str]] = {}
        for n in lengths:
            group = sorted(groups[n])
            if len(group) < 2:
                raise TokenizationError(
                    f"only {len(group)} word(s) take exactly {n} token(s) in this tokenizer, so no "
                    f"train/held-out split is possible; supply more words or drop {n} from lengths."
                )
            rng.shuffle(group)
            k = max(1, round(len(group) * test_fraction))
            test[n], train[n] = sorted(group[:k]), sorted(group[k:])
        return cls(train=train, test=test, seed=seed, lengths=lengths)

    def __repr__(self) -> str:
        n = {name: sum(len(v) for v in words.values()) for name, words in (("train", self.train), ("test", self.test))}
        return short_repr(self, [f"{n['train']} training and {n['test']} held-out words",
                                 "by token count " + ", ".join(f"{k}: {len(self.train.get(k, []))}+"
                                                               f"{len(self.test.get(k, []))}" for k in self.lengths),
                                 f"seed {self.seed}"])

    def split(self, name: str) -> dict[int, list[str]]:
        if name not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {name!r}.")
        return self.train if name == "train" else self.test

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "source": self.source, "lengths": list(self.lengths),
                "train": {str(k): v for k, v in self.train.items()},
                "test": {str(k): v for k, v in self.test.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WordVocab":
        return cls(train={int(k): list(v) for k, v in d["train"].items()},
                   test={int(k): list(v) for k, v in d["test"].items()},
                   seed=int(d.get("seed", 0)), source=d.get("source", ""),
                   lengths=tuple(int(n) for n in d.get("lengths", (1, 2, 3))))
