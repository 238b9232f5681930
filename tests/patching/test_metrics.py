import pytest
import torch

from wordpos.patching import ProbeMetric, make_pairs
from wordpos.probing import ConfigError, hooks


@pytest.mark.parametrize("kind", ["logit_diff", "projection"])
def test_normalised_metric_is_one_on_clean_and_zero_on_corrupted(tiny_model, tiny_pairs, tiny_probe, kind):
    with torch.no_grad():
        _, c = tiny_model.run_with_cache(tiny_pairs.clean)
        _, r = tiny_model.run_with_cache(tiny_pairs.corrupted)
    clean, corr = c[hooks.resid(1)].double(), r[hooks.resid(1)].double()  # random model: tiny spans
    m = ProbeMetric(tiny_probe, tiny_pairs, kind=kind)
    m.calibrate(clean, corr)
    assert torch.allclose(m(clean), torch.ones(1, dtype=clean.dtype), atol=1e-5)
    assert torch.allclose(m(corr), torch.zeros(1, dtype=clean.dtype), atol=1e-5)
    stacked = torch.cat([clean, corr, clean])  # P copies of the batch → one value per copy
    assert torch.allclose(m(stacked), torch.tensor([1.0, 0.0, 1.0], dtype=clean.dtype), atol=1e-5)


def test_logit_diff_matches_a_hand_computation(tiny_model, tiny_pairs, tiny_probe):
    with torch.no_grad():
        _, c = tiny_model.run_with_cache(tiny_pairs.clean)
    resid = c[hooks.resid(1)]
    m = ProbeMetric(tiny_probe, tiny_pairs)
    vals = []
    for i in range(len(tiny_pairs)):
        for t in range(tiny_pairs.target_pos.shape[1]):
            if tiny_pairs.target_mask[i, t]:
                logits = tiny_probe.decision_function(resid[i, tiny_pairs.target_pos[i, t]][None].numpy())[0]
                vals.append(logits[tiny_pairs.clean_labels[i, t]] - logits[tiny_pairs.corrupted_labels[i, t]])
    assert abs(float(m.raw(resid)) - sum(vals) / len(vals)) < 1e-4


def test_labels_beyond_the_probe_are_refused(gpt2_tok, small_data, tiny_probe):
    pairs = make_pairs(gpt2_tok, 3, vocab=small_data.vocab, n_words=9)
    with pytest.raises(ConfigError, match="probe knows 7"):
        ProbeMetric(tiny_probe, pairs)


def test_accuracy_metric_counts_targets_read_as_the_clean_index(tiny_model, tiny_pairs, tiny_probe):
    with torch.no_grad():
        _, c = tiny_model.run_with_cache(tiny_pairs.clean)
    resid = c[hooks.resid(1)]
    m = ProbeMetric(tiny_probe, tiny_pairs, kind="accuracy")
    mask = tiny_pairs.target_mask
    x = resid[torch.arange(len(tiny_pairs))[:, None].expand_as(mask)[mask], tiny_pairs.target_pos[mask]]
    expected = (tiny_probe.predict(x.numpy()) == tiny_pairs.clean_labels[mask].numpy()).mean()
    assert abs(float(m.raw(resid)) - expected) < 1e-6
    m.clean_value, m.corrupted_value = 0.5, 0.5
    with pytest.raises(ConfigError, match="same on clean and corrupted"):
        m(resid)
