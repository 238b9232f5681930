import numpy as np

from wordpos.probing import PositionBaseline, WordIndexDataset, analytic_position_baseline, position_baseline_accuracy


def test_analytic_reference_baseline_is_54_6_percent():
    assert abs(analytic_position_baseline(19, 7, (1, 2, 3)) - 0.5458) < 1e-3
    assert analytic_position_baseline(19, 1, (1, 2, 3)) == 1.0


def test_empirical_baseline_on_reference_recipe_matches(gpt2_tok):
    d = WordIndexDataset.default(gpt2_tok, n_prompts=4096, seed=0)
    acc = position_baseline_accuracy(d.train.word_last.reshape(-1), d.train.labels,
                                     d.test.word_last.reshape(-1), d.test.labels)
    assert abs(acc - 0.546) < 0.01


def test_position_baseline_uses_majority_and_nearest_position():
    b = PositionBaseline().fit([1, 1, 1, 2, 2, 5], [0, 0, 1, 1, 1, 3])
    assert b.predict([1, 2, 5, 6, 100, 0]).tolist() == [0, 1, 3, 3, 3, 0]
    assert b.score([1, 2], [0, 1]) == 1.0
    assert isinstance(b.classes_, np.ndarray)
