"""Controls for the probe: what can be had from absolute position alone, and from nothing at all.

The position-only classifier predicts, for each absolute token position, the word index most often
seen there in training: it is the Bayes-optimal rule when position is all you know (54.6% on the
reference recipe). A probe beats it only if the residual stream says more than "I am token 23".
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


class PositionBaseline(ClassifierMixin, BaseEstimator):
    """Predict the most frequent word index for each absolute position (``X`` = positions ``[n]`` or
    ``[n, 1]``). Unseen positions take the answer of the nearest seen position."""

    def fit(self, X: Any, y: Any) -> "PositionBaseline":
        pos, y = np.asarray(X).reshape(-1), np.asarray(y).reshape(-1)
        counts: dict[int, Counter] = defaultdict(Counter)
        for p, label in zip(pos.tolist(), y.tolist()):
            counts[p][label] += 1
        # ties break to the smaller index, deterministically
        self.table_ = {p: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for p, c in counts.items()}
        self.positions_ = np.array(sorted(self.table_))
        self.classes_ = np.unique(y)
        return self

    def predict(self, X: Any) -> np.ndarray:
        pos = np.asarray(X).reshape(-1)
        idx = np.clip(np.searchsorted(self.positions_, pos), 0, len(self.positions_) - 1)
        left = np.clip(idx - 1, 0, len(self.positions_) - 1)
        nearest = np.where(np.abs(self.positions_[left] - pos) < np.abs(self.positions_[idx] - pos),
                           self.positions_[left], self.positions_[idx])
        return np.array([self.table_[int(p)] for p in nearest])


def position_baseline_accuracy(train_pos: Any, train_y: Any, test_pos: Any, test_y: Any) -> float:
    """Accuracy on the test samples of the position-only classifier fitted on the train samples."""
    return float(PositionBaseline().fit(train_pos, train_y).score(test_pos, test_y))


def analytic_position_baseline(prefix_len: int = 19, n_words: int = 7, lengths: Sequence[int] = (1, 2, 3)) -> float:
    """Exact Bayes-optimal position-only accuracy for i.i.d. uniform word lengths and no anchors
    (enumerates every length sequence; 0.5458 for the reference recipe)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for seq in itertools.product(lengths, repeat=n_words):
        p = prefix_len - 1
        for k, n in enumerate(seq):
            p += n
            counts[p][k] += 1
    total = len(lengths) ** n_words * n_words
    return sum(max(c.values()) for c in counts.values()) / total


def shuffled_label_accuracy(make_probe: Callable[[], Any], X_train: Any, y_train: Any, X_test: Any, y_test: Any,
                            seed: int = 0) -> float:
    """Accuracy of a probe fitted on permuted labels: what the probe's capacity alone buys (≈ chance)."""
    rng = np.random.default_rng(seed)
    y_perm = rng.permutation(np.asarray(y_train))
    return float(make_probe().fit(X_train, y_perm).score(X_test, y_test))
