"""Result reprs on inputs the README example does not make: other axes, nothing measured, uneven targets."""
import numpy as np
import torch

from wordpos.patching import EffectResult, PatchingPairs


def test_effect_result_repr_points_at_the_largest_change_on_any_axes():
    e = np.array([[0.1, -0.7, np.nan], [0.3, 0.2, 0.0]])
    r = repr(EffectResult(e, ("layer", "pos"), "activation", "m", coords={"layer": [0, 1], "pos": [19, 20, 21]}))
    assert "largest: layer 0, pos 20 -0.7" in r and "float64[2×3] over layer×pos" in r
    heads = repr(EffectResult(e, ("layer", "head"), "path", "m", direction="noising", n_prompts=8))
    assert "largest: 0.1 -0.7, 1.0 +0.3, 1.1 +0.2" in heads and "noising" in heads and "8 prompts" in heads
    assert "nothing measured" in repr(EffectResult(np.full((2, 2), np.nan), ("layer", "pos"), "activation", "m"))


def test_pairs_repr_gives_the_range_of_targets():
    clean = torch.zeros(3, 10, dtype=torch.long)
    pos = torch.tensor([[5, 6], [5, 6], [5, 6]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    r = repr(PatchingPairs(clean, clean + 1, pos, pos * 0, pos * 0 + 1, mask))
    assert "3 clean/corrupted pairs of 10 tokens" in r and "1–2 target words each" in r


def test_ablation_repr_says_when_random_draws_repeat_a_set():
    from wordpos.patching import AblationResult

    same = [[(1, 0), (1, 2)]] * 3
    r = repr(AblationResult([(1, 1), (1, 3)], "mean", 0.4, 0.96, 0.57, {}, [0.8, 0.8, 0.8], same, n_samples=10))
    assert "3 random sets (1 distinct) 80.0% ± 0.0" in r and "ablation of 1.1, 1.3" in r
    other = [[(1, 0), (1, 2)], [(0, 1), (1, 2)]]
    assert "2 random sets 70.0% ± 10.0" in repr(AblationResult([(1, 1)], "mean", 0.4, 0.96, 0.57, {}, [0.6, 0.8],
                                                              other))


def test_heatmap_colour_bars_name_what_changed():
    """Patching effects are changes in the normalised metric (the accuracy metric too); ablation's are accuracy."""
    e = np.zeros((2, 3))
    bar = lambda r: r.figure().data[0].colorbar.title.text  # noqa: E731
    assert bar(EffectResult(e, ("layer", "head"), "activation", "probe_accuracy")) == "change in normalised metric"
    assert bar(EffectResult(e, ("layer", "head"), "ablation", "probe_accuracy (mean ablation)",
                            direction="ablation")) == "accuracy change"
