"""Word-index datasets: prompts of random words with full bookkeeping.

The reference recipe (Nanda & Gurnee, 2023): a fixed prefix ending in an anchor ("...Philadelphia.\\nWhen",
19 GPT-2 tokens with BOS), then 7 lowercase words of 1-3 tokens each (token length uniform), words from
an 80/20 train/held-out split of a frequent-word vocabulary. Every prompt keeps its tokens, the word index
of every token, the first/last token of each word and the absolute positions, so probes and patching can
pick any token class without re-tokenizing.

Prompts are built by concatenating token ids (sequence start + prefix + each word's own tokens), which is
exactly what the tokenizer gives for the whole string because each word starts with a space (checked by
:meth:`PromptSet.check_tokenization`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from wordpos.probing.errors import ConfigError, TokenizationError
from wordpos.probing.io import check_seed
from wordpos.probing.reprs import array_summary, short_repr
from wordpos.probing.vocab import WordVocab, word_tokens, words_tokens

REFERENCE_PREFIX = (
    "The United States Declaration of Independence received its first formal public reading, in "
    "Philadelphia.\nWhen"
)
DEFAULT_ANCHORS = (".", ",", "\n")
Positions = Literal["word_final", "word_first", "all"]
SPLITS = ("train", "val", "test")


def sequence_start_id(tokenizer: Any) -> int | None:
    """The token prepended to every prompt: BOS when the tokenizer has one, else EOS (GPT-2's BOS *is*
    its EOS, ``<|endoftext|>``), else nothing. Models are trained on documents that follow such a token,
    and it gives attention heads a resting place."""
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return None


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse what is not a tokenizer (a model, a model name) before any word is drawn."""
    if isinstance(tokenizer, (str, bytes)) or not callable(getattr(tokenizer, "encode", None)):
        raise ConfigError(f"expected the model's tokenizer (e.g. model.tokenizer), got {type(tokenizer).__name__}"
                          f"{' ' + repr(tokenizer) if isinstance(tokenizer, str) else ''}.")


@dataclass
class DatasetConfig:
    """Everything that determines a :class:`WordIndexDataset` (saved with every run)."""

    n_prompts: int = 4096
    n_words: int = 7
    lengths: tuple[int, ...] = (1, 2, 3)
    prefixes: tuple[str, ...] = (REFERENCE_PREFIX,)
    anchors: tuple[str, ...] = ()
    anchor_prob: float = 0.0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    vocab_test_fraction: float = 0.2
    vocab_size: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        self.lengths = tuple(int(n) for n in self.lengths)
        self.prefixes = tuple(self.prefixes)
        self.anchors = tuple(self.anchors)
        if self.n_prompts < 10:
            raise ConfigError(f"n_prompts must be at least 10 (got {self.n_prompts}): the train, validation "
                              "and held-out splits each need prompts.")
        if self.n_words < 1:
            raise ConfigError(f"n_words must be at least 1, got {self.n_words}.")
        check_seed(self.seed)
        if not self.lengths or min(self.lengths) < 1:
            raise ConfigError(f"lengths must be positive token counts such as (1, 2, 3), got {self.lengths}.")
        if not self.prefixes:
            raise ConfigError("prefixes is empty: give at least one prefix (it may be '').")
        if not 0.0 <= self.anchor_prob <= 1.0:
            raise ConfigError(f"anchor_prob must be in [0, 1], got {self.anchor_prob}.")
        if self.anchor_prob > 0 and not self.anchors:
            raise ConfigError("anchor_prob > 0 needs anchors, e.g. anchors=('.', ',', '\\n').")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1, got "
                              f"{self.val_fraction} and {self.test_fraction}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class PromptSet:
    """One split of prompts with per-token and per-word bookkeeping.

    Token tensors are right-padded to a common length (padding never affects earlier positions in a
    causal model); ``lengths`` gives each prompt's real length. Word arrays are ``[n_prompts, n_words]``;
    ``word_labels`` is the word index the probe predicts (counted from the last anchor when anchors are
    inserted, else from the first word).
    """

    tokens: Int[Tensor, "n pos"]
    lengths: Int[Tensor, " n"]
    word_index: Int[Tensor, "n pos"]  # label of every token's word, -1 for prefix/anchor/padding
    word_first: Int[Tensor, "n word"]  # absolute position of each word's first token
    word_last: Int[Tensor, "n word"]  # absolute position of each word's last token
    word_labels: Int[Tensor, "n word"]
    words: list[list[str]]
    prefix_len: Int[Tensor, " n"]
    split: str = "train"

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return short_repr(self, [f"{self.split}: {len(self)} prompts of {self.max_len() if len(self) else 0} tokens or fewer",
                                 f"tokens {array_summary(self.tokens)}", f"{self.n_words} words each"])

    @property
    def n_words(self) -> int:
        return int(self.word_last.shape[1])

    @property
    def labels(self) -> Int[Tensor, " sample"]:
        """Word-index labels of the word-final (equally word-first) samples, in (prompt, word) order."""
        return self.sample_labels("word_final")

    def positions(self, which: Positions = "word_final") -> tuple[Int[Tensor, " sample"], Int[Tensor, " sample"]]:
        """``(prompt_idx, abs_pos)`` of each sample for a token class, in (prompt, position) order."""
        if which in ("word_final", "word_first"):
            pos = self.word_last if which == "word_final" else self.word_first
            prompt = torch.arange(len(self)).unsqueeze(1).expand_as(pos)
            valid = pos >= 0  # texts with fewer words than the longest are padded with -1
            return prompt[valid], pos[valid]
        if which == "all":
            prompt, pos = torch.nonzero(self.word_index >= 0, as_tuple=True)
            return prompt, pos
        raise ConfigError(f"positions must be 'word_final', 'word_first' or 'all', got {which!r}.")

    def sample_labels(self, which: Positions = "word_final") -> Int[Tensor, " sample"]:
        prompt, pos = self.positions(which)
        return self.word_index[prompt, pos]

    def max_len(self) -> int:
        return int(self.lengths.max())

    def subset(self, idx: Sequence[int] | Tensor) -> "PromptSet":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return PromptSet(
            tokens=self.tokens[idx], lengths=self.lengths[idx], word_index=self.word_index[idx],
            word_first=self.word_first[idx], word_last=self.word_last[idx],
            word_labels=self.word_labels[idx], words=[self.words[i] for i in idx.tolist()],
            prefix_len=self.prefix_len[idx], split=self.split,
        )

    def text(self, i: int, tokenizer: Any) -> str:
        return tokenizer.decode(self.tokens[i, : int(self.lengths[i])].tolist())

    def check_tokenization(self, tokenizer: Any, n: int = 16, skip_first: bool = True) -> None:
        """Raise if re-tokenizing the decoded text of the first ``n`` prompts gives other tokens."""
        for i in range(min(n, len(self))):
            ids = self.tokens[i, : int(self.lengths[i])].tolist()
            body = ids[1:] if skip_first else ids
            again = tokenizer.encode(tokenizer.decode(body), add_special_tokens=False)
            if list(again) != list(body):
                raise TokenizationError(
                    f"prompt {i} does not round-trip through the tokenizer: built from word tokens "
                    f"{body[:12]}..., re-tokenized as {list(again)[:12]}...; the words do not segment "
                    "as they do in context. Use words that start with a space and contain only letters."
                )


@dataclass
class WordIndexDataset:
    """Train, validation and held-out-word test prompts for the word-index probe."""

    train: PromptSet
    val: PromptSet
    test: PromptSet
    config: DatasetConfig
    vocab: WordVocab | None
    seq_start_id: int | None
    pad_id: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        c = self.config
        vocab = "" if self.vocab is None else repr(self.vocab)
        return short_repr(self, [" / ".join(f"{s} {len(self.split(s))}" for s in SPLITS) + " prompts",
                                 f"{c.n_words} words of {'/'.join(map(str, c.lengths))} tokens", vocab,
                                 f"seed {c.seed}"])

    def split(self, name: str) -> PromptSet:
        if name not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {name!r}.")
        return getattr(self, name)

    def max_len(self) -> int:
        return max(s.max_len() for s in (self.train, self.val, self.test))

    def to_dict(self) -> dict[str, Any]:
        """The settings and word lists (not the tokens) for saving with results."""
        return {"config": self.config.to_dict(), "seq_start_id": self.seq_start_id,
                "vocab": None if self.vocab is None else self.vocab.to_dict(),
                "sizes": {s: len(self.split(s)) for s in SPLITS}, **self.extra}

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def default(cls, tokenizer: Any, n_prompts: int = 4096, seed: int = 0, **overrides: Any) -> "WordIndexDataset":
        """The reference recipe (7 words of 1-3 tokens after the Declaration prefix)."""
        return cls.generate(tokenizer, DatasetConfig(n_prompts=n_prompts, seed=seed, **overrides))

    @classmethod
    def generate(cls, tokenizer: Any, config: DatasetConfig | None = None, vocab: WordVocab | None = None,
                 words: Sequence[str] | None = None) -> "WordIndexDataset":
        """Sample prompts under ``config``; ``words`` replaces the default vocabulary (every word must
        take one of ``config.lengths`` tokens)."""
        check_tokenizer(tokenizer)
        config = config or DatasetConfig()
        if words is not None:
            words = list(words)
            if not words:
                raise ConfigError("the word list is empty: pass at least one word per token length.")
            for w in words:
                n = len(word_tokens(tokenizer, w))
                if n not in config.lengths:
                    raise TokenizationError(
                        f"word {w!r} takes {n} token(s) in this tokenizer (' {w}' -> "
                        f"{tokenizer.convert_ids_to_tokens(word_tokens(tokenizer, w))}), but the recipe asks "
                        f"for words of {config.lengths} tokens. Remove it, or widen lengths."
                    )
        if vocab is None:
            from wordpos.probing.vocab import frequent_words

            vocab = WordVocab.build(tokenizer, words if words is not None else frequent_words(config.vocab_size),
                                    lengths=config.lengths, test_fraction=config.vocab_test_fraction,
                                    seed=config.seed)
        start = sequence_start_id(tokenizer)
        pad = start if start is not None else int(getattr(tokenizer, "pad_token_id", None) or 0)
        prefix_ids = [list(tokenizer.encode(p, add_special_tokens=False)) for p in config.prefixes]
        anchor_ids = []
        for a in config.anchors:
            ids = list(tokenizer.encode(a, add_special_tokens=False))
            if len(ids) != 1:
                raise TokenizationError(f"anchor {a!r} takes {len(ids)} tokens; anchors must be one token.")
            anchor_ids.append(ids[0])
        every = [w for split in ("train", "test") for _, ws in sorted(vocab.split(split).items()) for w in ws]
        toks = dict(zip(every, words_tokens(tokenizer, every))).__getitem__  # one batch call, memoised

        n_test = max(1, round(config.n_prompts * config.test_fraction))
        n_val = max(1, round(config.n_prompts * config.val_fraction))
        n_train = config.n_prompts - n_test - n_val
        sets = {}
        for k, (name, n, words_split) in enumerate(
            [("train", n_train, "train"), ("val", n_val, "train"), ("test", n_test, "test")]
        ):
            rng = np.random.default_rng([config.seed, k])
            sets[name] = _sample_split(
                rng, n, config, vocab.split(words_split), prefix_ids, anchor_ids, start, pad, toks, name
            )
        return cls(train=sets["train"], val=sets["val"], test=sets["test"], config=config, vocab=vocab,
                   seq_start_id=start, pad_id=pad)

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Sequence[str], *, seed: int = 0, val_fraction: float = 0.1,
                   test_fraction: float = 0.2, anchors: Sequence[str] = ()) -> "WordIndexDataset":
        """Natural text: words are whitespace-separated; a token's label is the index of its word in the
        text (counted from the last word ending in an anchor character, when ``anchors`` are given).
        Prompts (not words) are split into train/val/test."""
        texts = [t for t in texts if t.strip()]
        if len(texts) < 3:
            raise ConfigError(f"from_texts needs at least 3 non-empty texts (one per split), got {len(texts)}.")
        start = sequence_start_id(tokenizer)
        pad = start if start is not None else 0
        rows = []
        for t in texts:
            enc = tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
            spans, pos = [], 0
            for w in t.split():
                s = t.index(w, pos)
                spans.append((s, s + len(w)))
                pos = s + len(w)
            labels, counter = [], 0
            word_of_token = []
            for a, b in offsets:
                mid = next((j for j, (s, e) in enumerate(spans) if s < b and a < e), -1)
                word_of_token.append(mid)
            for j, (s, e) in enumerate(spans):
                labels.append(counter)
                counter = 0 if anchors and any(t[e - 1] == a.strip() or t[e - 1:e] == a for a in anchors) else counter + 1
            rows.append((ids, word_of_token, labels))
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(rows))
        n_test = max(1, round(len(rows) * test_fraction))
        n_val = max(1, round(len(rows) * val_fraction))
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        sets = {name: _from_rows([rows[i] for i in idx], start, pad, name) for name, idx in parts.items()}
        cfg = DatasetConfig(n_prompts=max(10, len(rows)), n_words=max(len(r[2]) for r in rows), prefixes=("",),
                            anchors=tuple(anchors), seed=seed, val_fraction=val_fraction,
                            test_fraction=test_fraction)
        return cls(train=sets["train"], val=sets["val"], test=sets["test"], config=cfg, vocab=None,
                   seq_start_id=start, pad_id=pad, extra={"source": "texts", "n_texts": len(rows)})


def _sample_split(rng: np.random.Generator, n: int, config: DatasetConfig, vocab: dict[int, list[str]],
                  prefix_ids: list[list[int]], anchor_ids: list[int], start: int | None, pad: int,
                  toks, name: str) -> PromptSet:
    seqs, word_idx_rows, firsts, lasts, labels, words_all, prefix_lens = [], [], [], [], [], [], []
    lengths = np.asarray(config.lengths)
    for i in range(n):
        ids = ([start] if start is not None else []) + prefix_ids[i % len(prefix_ids)]
        prefix_lens.append(len(ids))
        widx = [-1] * len(ids)
        first, last, lab, words = [], [], [], []
        count = 0
        for j in range(config.n_words):
            if j > 0 and anchor_ids and rng.random() < config.anchor_prob:
                ids.append(anchor_ids[int(rng.integers(len(anchor_ids)))])
                widx.append(-1)
                count = 0
            length = int(lengths[rng.integers(len(lengths))])
            pool = vocab[length]
            w = pool[int(rng.integers(len(pool)))]
            t = toks(w)
            first.append(len(ids))
            ids.extend(t)
            widx.extend([count] * len(t))
            last.append(len(ids) - 1)
            lab.append(count)
            words.append(w)
            count += 1
        seqs.append(ids)
        word_idx_rows.append(widx)
        firsts.append(first)
        lasts.append(last)
        labels.append(lab)
        words_all.append(words)
    return _pack(seqs, word_idx_rows, firsts, lasts, labels, words_all, prefix_lens, pad, name)


def _from_rows(rows, start: int | None, pad: int, name: str) -> PromptSet:
    seqs, widxs, firsts, lasts, labels, words, plens = [], [], [], [], [], [], []
    n_words = max(len(r[2]) for r in rows)
    for ids, word_of_token, lab in rows:
        off = 1 if start is not None else 0
        seq = ([start] if start is not None else []) + ids
        widx = [-1] * off + [lab[w] if w >= 0 else -1 for w in word_of_token]
        first = [-1] * n_words
        last = [-1] * n_words
        for p, w in enumerate(word_of_token):
            if w >= 0:
                if first[w] < 0:
                    first[w] = p + off
                last[w] = p + off
        seqs.append(seq)
        widxs.append(widx)
        firsts.append(first)
        lasts.append(last)
        labels.append(lab + [-1] * (n_words - len(lab)))
        words.append([])
        plens.append(off)
    ps = _pack(seqs, widxs, firsts, lasts, labels, words, plens, pad, name)
    return ps


def _pack(seqs, widxs, firsts, lasts, labels, words, prefix_lens, pad: int, name: str) -> PromptSet:
    n, L = len(seqs), max(len(s) for s in seqs)
    tokens = np.full((n, L), pad, dtype=np.int64)  # filled row by row in numpy: a torch.tensor per row costs 10x
    word_index = np.full((n, L), -1, dtype=np.int64)
    for i, (s, w) in enumerate(zip(seqs, widxs)):
        tokens[i, : len(s)] = s
        word_index[i, : len(w)] = w
    return PromptSet(
        tokens=torch.from_numpy(tokens), lengths=torch.tensor([len(s) for s in seqs]),
        word_index=torch.from_numpy(word_index),
        word_first=torch.tensor(firsts), word_last=torch.tensor(lasts), word_labels=torch.tensor(labels),
        words=words, prefix_len=torch.tensor(prefix_lens), split=name,
    )
