import pytest
import torch

from wordpos.patching import make_pairs
from wordpos.patching.corruptions import check_pair_shapes, derangement, resample_reference
from wordpos.probing import ConfigError


def test_pairs_keep_positions_and_shift_indices(gpt2_tok, small_data):
    from wordpos.probing.datasets import REFERENCE_PREFIX, sequence_start_id

    pairs = make_pairs(gpt2_tok, 12, vocab=small_data.vocab, seed=3)
    start = sequence_start_id(gpt2_tok)
    head = (start is not None) + len(gpt2_tok.encode(REFERENCE_PREFIX, add_special_tokens=False))
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
        # the swapped region is the 3 tokens right after the prefix (swap_at=0); the prompts agree everywhere else
        assert torch.equal(pairs.clean[i, :head], pairs.corrupted[i, :head])
        assert torch.equal(pairs.clean[i, head + 3:], pairs.corrupted[i, head + 3:])
        assert not torch.equal(pairs.clean[i, head:head + 3], pairs.corrupted[i, head:head + 3])
        # labels, counted by hand: words (tokens with a leading space) from the prefix's end to the target, minus 1
        for t, lc, lr in zip(pairs.target_pos[i][m[i]].tolist(), pairs.clean_labels[i][m[i]].tolist(),
                             pairs.corrupted_labels[i][m[i]].tolist()):
            for seq, label in ((pairs.clean[i], lc), (pairs.corrupted[i], lr)):
                toks = gpt2_tok.convert_ids_to_tokens(seq[head:t + 1].tolist())
                assert sum(tok.startswith("Ġ") for tok in toks) - 1 == label


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


@pytest.mark.parametrize("n", [2, 3, 7, 8, 64, 65])
def test_derangement_is_a_permutation_without_fixed_points(n):
    for seed in range(20):
        perm = derangement(n, seed)
        assert sorted(perm.tolist()) == list(range(n))  # a permutation: every prompt used exactly once
        assert all(perm[i] != i for i in range(n))  # no prompt keeps its own activation
    assert torch.equal(derangement(n, 5), derangement(n, 5))  # seeded


def test_derangement_of_one_prompt_is_refused():
    with pytest.raises(ConfigError, match="at least 2 prompts"):
        derangement(1)
    with pytest.raises(ConfigError, match="at least 2 prompts"):
        resample_reference(torch.zeros(1, 3, 2))


def test_derangement_draws_every_derangement_of_three():
    # n = 3 has exactly two derangements, (1, 2, 0) and (2, 0, 1); both must occur
    seen = {tuple(derangement(3, s).tolist()) for s in range(40)}
    assert seen == {(1, 2, 0), (2, 0, 1)}


@pytest.mark.parametrize("n", [2, 5, 6])
def test_resample_reference_gives_each_prompt_another_prompts_activation(n):
    acts = torch.arange(float(n))[:, None, None].expand(n, 3, 2)
    out = resample_reference(acts, seed=0)
    src = out[:, 0, 0].long()
    assert sorted(src.tolist()) == list(range(n)) and (src != torch.arange(n)).all()
    assert torch.equal(out, acts[src])
