import numpy as np
import pytest
import torch

from patching import ablate_heads, head_roles, parse_heads
from patching.ablation import ablated_predictions, head_means
from patching.roles import ideal_counter_pattern
from probing import ConfigError, as_engine, collect_residuals


def test_no_ablation_reproduces_the_probe_accuracy(tiny_model, tiny_probe, small_data):
    engine = as_engine(tiny_model)
    pred = ablated_predictions(engine, tiny_probe, small_data.test, [], "zero")
    acts = collect_residuals(tiny_model, small_data, layers=[1], splits=("test",), progress=False)
    assert np.array_equal(pred, tiny_probe.predict(acts.test(1)))


def test_mean_ablation_uses_position_wise_means(tiny_model, small_data):
    engine = as_engine(tiny_model)
    means = head_means(engine, small_data.train, [0])
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(small_data.train.tokens[:, :small_data.train.max_len()])
    z = cache["blocks.0.attn.hook_z"]
    # position 5 is inside the prefix for every prompt, so its mean is the plain mean
    assert torch.allclose(means[0][5], z[:, 5].mean(0), atol=1e-5)


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_ablate_heads_reports_controls(tiny_model, tiny_probe, small_data, method):
    res = ablate_heads(tiny_model, tiny_probe, small_data, "0.1,1.2", method=method, n_random=2, progress=False)
    assert res.heads == [(0, 1), (1, 2)]
    assert len(res.random_accuracies) == 2 and all(len(h) == 2 for h in res.random_heads)
    assert all({L for L, _ in h} <= {0, 1} for h in res.random_heads)
    assert 0 <= res.accuracy <= 1 and res.n_samples == len(small_data.test) * 7
    d = res.to_dict()
    assert d["drop"] == pytest.approx(res.clean_accuracy - res.accuracy)


def test_ablation_bad_input(tiny_model, tiny_probe, small_data):
    with pytest.raises(ConfigError, match="empty"):
        parse_heads("")
    with pytest.raises(ConfigError, match="LAYER.HEAD"):
        parse_heads("3-4")
    with pytest.raises(ConfigError, match="out of range"):
        ablate_heads(tiny_model, tiny_probe, small_data, "0.9", progress=False)
    with pytest.raises(ConfigError, match="method"):
        ablate_heads(tiny_model, tiny_probe, small_data, "0.1", method="boil", progress=False)


def test_ideal_counter_pattern_by_hand():
    # tokens: BOS, word, anchor, word, cont, word → from the last token: e^3 on the anchor, e^1 on each word start
    is_anchor = torch.tensor([[False, False, True, False, False, False]])
    is_space = torch.tensor([[False, True, False, True, False, True]])
    pat = ideal_counter_pattern(is_anchor, is_space)
    e3, e1 = np.exp(3), np.exp(1)
    expected = torch.tensor([0, e1, e3, e1, 0, e1]) / (e3 + 3 * e1)
    assert torch.allclose(pat[0, 5], expected.float(), atol=1e-6)
    assert torch.allclose(pat[0, 0], torch.tensor([1.0, 0, 0, 0, 0, 0]))


def test_head_roles_shapes_and_ranges(tiny_model, small_data):
    roles = head_roles(tiny_model, small_data.test)
    for k, v in roles.scores.items():
        assert v.shape == (2, 4) and np.all(v >= -1e-6) and np.all(v <= 1 + 1e-6), k
    assert isinstance(roles.label(0, 0), str)


def test_anchor_evidence_recovers_the_planted_counter(planted_model, planted_data):
    """The planted counter scores exactly 3 on anchors and 1 on word starts (-20 elsewhere): the evidence
    must read a score difference of 2 and no attention elsewhere; the previous-token distractor must not."""
    from patching.roles import EVIDENCE_KEYS, anchor_evidence

    ev = anchor_evidence(planted_model, planted_data.test, [(0, 2), (0, 0)], max_prompts=32)
    counter, prev = ev["0.2"], ev["0.0"]
    assert set(counter) == set(EVIDENCE_KEYS)
    assert counter["anchor_vs_space_logit"] == pytest.approx(2.0, abs=1e-3)
    assert counter["to_other"] == pytest.approx(0.0, abs=1e-4) and counter["to_bos"] < 1e-4
    assert counter["counter_score"] > 0.999
    # the reference prefix holds one of each anchor, so each kind gets the same mass
    assert counter["to_period"] == pytest.approx(counter["to_comma"], abs=1e-6)
    assert counter["to_newline"] == pytest.approx(counter["to_comma"], abs=1e-6)
    parts = sum(counter[k] for k in ("to_period", "to_comma", "to_newline", "to_space", "to_bos", "to_other"))
    assert parts == pytest.approx(1.0, abs=1e-5)
    assert prev["counter_score"] < 0.5 and abs(prev["anchor_vs_space_logit"] - 2.0) > 1.0


def test_anchor_evidence_and_patterns_bad_head(planted_model, planted_data):
    from patching.roles import anchor_evidence, head_patterns

    with pytest.raises(ConfigError, match="out of range"):
        anchor_evidence(planted_model, planted_data.test, [(0, 7)])
    pats, tokens = head_patterns(planted_model, planted_data.test, [(0, 2), (1, 1)])
    T = int(planted_data.test.lengths[0])
    assert set(pats) == {"0.2", "1.1"} and len(tokens) == T
    assert pats["0.2"].shape == (T, T) and np.allclose(pats["0.2"].sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(pats["1.1"], 1), 0.0)  # causal


def test_ablation_curve_on_the_planted_counter(planted_model, planted_data, planted_probe):
    """Ablating the planted counter (top of the ranking) must take the re-fitted probe most of the way to the
    position baseline; random heads of layer 0 must not."""
    from patching.ablation import ablation_curve

    rows = ablation_curve(planted_model, planted_probe, planted_data, ["0.2", "1.1"], [1, 2], method="zero",
                          n_random=2, progress=False)
    assert [r["k"] for r in rows] == [1, 2] and rows[0]["heads"] == ["0.2"] and rows[1]["heads"] == ["0.2", "1.1"]
    one = rows[0]
    gain = one["clean_accuracy"] - one["baseline_abs_pos_accuracy"]
    assert one["refit_accuracy"] - one["baseline_abs_pos_accuracy"] < 0.5 * gain
    assert one["random_refit_mean"] > one["refit_accuracy"] + 0.2
    with pytest.raises(ConfigError, match="ks must lie"):
        ablation_curve(planted_model, planted_probe, planted_data, ["0.2"], [2], progress=False)
