"""Clean/corrupted prompt pairs that keep every absolute position and change only word indices.

``split``: the clean prompt has one 3-token word; the corrupted prompt replaces it with three 1-token
words. Both have the same length and every later word ends at the same absolute position, but its word
index is 2 higher in the corrupted prompt. ``merge`` is the reverse (index 2 lower). A model that only
tracked token position could not tell the pair apart at the target tokens; a word counter can.

Targets are the word-final tokens of the words after the swap, with their clean and corrupted labels.
Also here: resample and mean references for ablation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from wordpos.probing.datasets import REFERENCE_PREFIX, sequence_start_id
from wordpos.probing.errors import ConfigError
from wordpos.probing.reprs import array_summary, short_repr
from wordpos.probing.vocab import WordVocab, word_tokens


@dataclass
class PatchingPairs:
    """``clean`` and ``corrupted`` token batches of equal shape; ``target_pos[i, t]`` the absolute position
    of target ``t`` of pair ``i`` (the same in both prompts), with ``clean_labels`` / ``corrupted_labels``.
    ``target_mask`` marks real targets (pairs may have fewer)."""

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    target_pos: Int[Tensor, "batch target"]
    clean_labels: Int[Tensor, "batch target"]
    corrupted_labels: Int[Tensor, "batch target"]
    target_mask: Tensor
    kind: str = "split"
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_pair_shapes(self.clean, self.corrupted)
        if self.target_pos.shape != self.clean_labels.shape or self.target_pos.shape != self.corrupted_labels.shape:
            raise ConfigError("target_pos, clean_labels and corrupted_labels must have the same [batch, target] shape.")
        if self.target_pos.shape[0] != self.clean.shape[0]:
            raise ConfigError(f"{self.target_pos.shape[0]} target rows for {self.clean.shape[0]} prompts.")

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def __repr__(self) -> str:
        n = self.target_mask.sum(1).tolist() if len(self) else [0]
        targets = f"{min(n)}" if min(n) == max(n) else f"{min(n)}–{max(n)}"
        return short_repr(self, [f"{len(self)} clean/corrupted pairs of {self.clean.shape[1]} tokens ({self.kind!r})",
                                 f"{targets} target words each", f"tokens {array_summary(self.clean)}"])

    def to(self, device: torch.device | str) -> "PatchingPairs":
        return PatchingPairs(self.clean.to(device), self.corrupted.to(device), self.target_pos.to(device),
                             self.clean_labels.to(device), self.corrupted_labels.to(device),
                             self.target_mask.to(device), self.kind, self.config)

    def subset(self, idx: slice | Tensor) -> "PatchingPairs":
        return PatchingPairs(self.clean[idx], self.corrupted[idx], self.target_pos[idx], self.clean_labels[idx],
                             self.corrupted_labels[idx], self.target_mask[idx], self.kind, self.config)

    def swap(self) -> "PatchingPairs":
        """The same pairs with clean and corrupted exchanged."""
        return PatchingPairs(self.corrupted, self.clean, self.target_pos, self.corrupted_labels, self.clean_labels,
                             self.target_mask, self.kind, self.config)


def check_pair_shapes(clean: Tensor, corrupted: Tensor) -> None:
    if clean.shape != corrupted.shape:
        raise ConfigError(
            f"clean and corrupted prompts must have identical shapes so positions line up, got {tuple(clean.shape)} "
            f"and {tuple(corrupted.shape)}; build pairs with patching.make_pairs (same length, same target positions)."
        )


def make_pairs(tokenizer: Any, n_pairs: int = 64, *, vocab: WordVocab | None = None, words: str = "test",
               kind: Literal["split", "merge"] = "split", n_words: int = 7, swap_at: int = 0,
               prefix: str = REFERENCE_PREFIX, seed: int = 0) -> PatchingPairs:
    """Seeded clean/corrupted pairs. The clean prompt has ``n_words - 2`` words (``split``) whose word
    ``swap_at`` has 3 tokens; the corrupted prompt has it replaced by three 1-token words (``n_words``
    words). Labels never exceed ``n_words - 1``, so a probe trained on ``n_words`` words reads them all.
    For ``merge`` the roles are reversed (clean has the three 1-token words)."""
    from wordpos.probing.datasets import check_tokenizer

    check_tokenizer(tokenizer)
    if n_pairs < 1:
        raise ConfigError(f"n_pairs must be at least 1, got {n_pairs}.")
    if kind not in ("split", "merge"):  # before any pair is built
        raise ConfigError(f"kind must be 'split' or 'merge', got {kind!r}.")
    if n_words < 4:
        raise ConfigError(f"n_words must be at least 4 for a split/merge pair (a 3-token word against three 1-token "
                          f"words, with a word after them), got {n_words}.")
    if not 0 <= swap_at < n_words - 3:
        raise ConfigError(f"swap_at={swap_at} must leave at least one word after the swap: use 0..{n_words - 4}.")
    vocab = vocab or WordVocab.build(tokenizer, seed=seed)
    pool = vocab.split(words)
    for n in (1, 2, 3):
        if not pool.get(n):
            raise ConfigError(f"the {words} vocabulary has no {n}-token words; corruptions need 1- and 3-token words.")
    rng = np.random.default_rng([seed, 17])
    start = sequence_start_id(tokenizer)
    head = ([start] if start is not None else []) + list(tokenizer.encode(prefix, add_special_tokens=False))
    n_short = n_words - 2
    rows = []
    for _ in range(n_pairs):
        def pick(n: int) -> list[int]:
            options = pool[n]
            return word_tokens(tokenizer, options[int(rng.integers(len(options)))])

        lengths = [int(x) for x in rng.integers(1, 4, size=n_short)]
        lengths[swap_at] = 3
        long_words = [pick(n) for n in lengths]
        three = [pick(1) for _ in range(3)]
        short_words = long_words[:swap_at] + three + long_words[swap_at + 1:]
        a = head + sum(long_words, [])
        b = head + sum(short_words, [])
        assert len(a) == len(b)
        ends = np.cumsum([len(head)] + [len(w) for w in long_words])[1:] - 1
        targets = ends[swap_at + 1:]
        la = np.arange(swap_at + 1, n_short)
        lb = la + 2
        rows.append((a, b, targets, la, lb))
    if kind == "merge":
        rows = [(b, a, t, lb, la) for a, b, t, la, lb in rows]
    T = max(len(r[0]) for r in rows)
    K = max(len(r[2]) for r in rows)
    pad = start if start is not None else 0
    clean = torch.full((n_pairs, T), pad, dtype=torch.long)
    corrupted = clean.clone()
    tpos = torch.zeros((n_pairs, K), dtype=torch.long)
    lc, lr = torch.zeros_like(tpos), torch.zeros_like(tpos)
    mask = torch.zeros((n_pairs, K), dtype=torch.bool)
    for i, (a, b, t, la, lb) in enumerate(rows):
        clean[i, : len(a)] = torch.tensor(a)
        corrupted[i, : len(b)] = torch.tensor(b)
        k = len(t)
        tpos[i, :k], lc[i, :k], lr[i, :k], mask[i, :k] = torch.tensor(t), torch.tensor(la), torch.tensor(lb), True
    config = {"n_pairs": n_pairs, "kind": kind, "n_words": n_words, "swap_at": swap_at, "words": words, "seed": seed,
              "prefix": prefix}
    return PatchingPairs(clean, corrupted, tpos, lc, lr, mask, kind=kind, config=config)


def mean_reference(acts: Float[Tensor, "batch pos *rest"]) -> Float[Tensor, "pos *rest"]:
    """Mean ablation reference: the activation averaged over prompts, per position."""
    return acts.mean(0)


def derangement(n: int, seed: int | torch.Generator = 0) -> Int[Tensor, " n"]:
    """A uniformly random permutation of ``0..n-1`` with no fixed point (``perm[i] != i`` for every ``i``): the
    resample-ablation rule "every prompt gets *another* prompt's activation". Rejection sampling: a random
    permutation is a derangement with probability ~1/e, so ~2.7 draws on average, for any ``n``.

    ``n < 2`` is refused (ConfigError): a single prompt has no other prompt to draw from. Callers draw one
    derangement over the whole prompt set (not per batch), so a last batch of one prompt is still resampled."""
    if n < 2:
        raise ConfigError(f"resample ablation needs at least 2 prompts to draw other prompts' activations from, got "
                          f"{n}; use more prompts or mean/zero ablation.")
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    ident = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=g)
        if not bool((perm == ident).any()):
            return perm


def resample_reference(acts: Float[Tensor, "batch pos *rest"], seed: int = 0) -> Float[Tensor, "batch pos *rest"]:
    """Resample ablation reference: prompt ``i`` gets prompt ``derangement(n, seed)[i]``'s activation."""
    perm = derangement(acts.shape[0], seed)
    return acts[perm.to(acts.device)]
