import pytest
import torch

from wordpos.probing import ConfigError, DatasetConfig, TokenizationError, WordIndexDataset


def test_reference_bookkeeping_is_consistent(small_data, gpt2_tok):
    ps = small_data.train
    assert ps.word_last.shape[1] == 7 and int(ps.prefix_len[0]) == 19
    for i in range(10):
        n = int(ps.lengths[i])
        assert ps.word_first[i, 0] == 19 and ps.word_last[i, -1] == n - 1
        for j in range(7):
            f, l = int(ps.word_first[i, j]), int(ps.word_last[i, j])
            assert 1 <= l - f + 1 <= 3
            assert (ps.word_index[i, f:l + 1] == j).all()
            assert gpt2_tok.decode(ps.tokens[i, f:l + 1]) == " " + ps.words[i][j]
        assert (ps.word_index[i, :19] == -1).all() and (ps.word_index[i, n:] == -1).all()
    assert torch.equal(ps.labels, ps.word_labels.reshape(-1))
    ps.check_tokenization(gpt2_tok)


def test_held_out_words_never_appear_in_training_prompts(small_data):
    train_words = {w for ws in small_data.train.words + small_data.val.words for w in ws}
    test_words = {w for ws in small_data.test.words for w in ws}
    assert train_words.isdisjoint(test_words)
    vocab = small_data.vocab
    assert set(sum(vocab.test.values(), [])).isdisjoint(sum(vocab.train.values(), []))


def test_same_seed_same_prompts_other_seed_other_prompts(gpt2_tok):
    a = WordIndexDataset.default(gpt2_tok, n_prompts=30, seed=1)
    b = WordIndexDataset.default(gpt2_tok, n_prompts=30, seed=1)
    c = WordIndexDataset.default(gpt2_tok, n_prompts=30, seed=2)
    assert torch.equal(a.test.tokens, b.test.tokens)
    assert not torch.equal(a.train.tokens, c.train.tokens)


def test_word_lengths_are_roughly_uniform(gpt2_tok):
    d = WordIndexDataset.default(gpt2_tok, n_prompts=600, seed=0)
    lens = (d.train.word_last - d.train.word_first + 1).reshape(-1)
    shares = torch.bincount(lens, minlength=4)[1:].float() / len(lens)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.03)


def test_anchor_variant_counts_from_last_anchor(gpt2_tok):
    cfg = DatasetConfig(n_prompts=60, anchors=(".", ",", "\n"), anchor_prob=0.5, seed=0)
    d = WordIndexDataset.generate(gpt2_tok, cfg)
    anchor_ids = {gpt2_tok.encode(a)[0] for a in (".", ",", "\n")}
    saw_reset = False
    for i in range(len(d.train)):
        labels = d.train.word_labels[i].tolist()
        for j in range(1, 7):
            between = d.train.tokens[i, d.train.word_last[i, j - 1] + 1: d.train.word_first[i, j]].tolist()
            if between:
                assert between[0] in anchor_ids and labels[j] == 0
                saw_reset = True
            else:
                assert labels[j] == labels[j - 1] + 1
    assert saw_reset


def test_prefix_list_is_rotated(gpt2_tok):
    cfg = DatasetConfig(n_prompts=20, prefixes=("One.\nTwo", "A much longer prefix, here.\nThen"))
    d = WordIndexDataset.generate(gpt2_tok, cfg)
    assert d.train.prefix_len[0] != d.train.prefix_len[1]
    assert d.train.prefix_len[0] == d.train.prefix_len[2]


def test_from_texts_labels_whitespace_words(gpt2_tok):
    d = WordIndexDataset.from_texts(gpt2_tok, ["the cat sat on the mat"] * 3 + ["unbelievably weird tokenization"] * 3)
    for ps in (d.train, d.val, d.test):
        prompt, pos = ps.positions("word_final")
        labels = ps.word_index[prompt, pos]
        assert (labels >= 0).all()
        assert labels.max() <= 5


def test_bad_words_and_configs_get_clear_errors(gpt2_tok):
    with pytest.raises(ConfigError, match="empty"):
        WordIndexDataset.generate(gpt2_tok, DatasetConfig(n_prompts=20), words=[])
    with pytest.raises(TokenizationError, match="antidisestablishmentarianism"):
        WordIndexDataset.generate(gpt2_tok, DatasetConfig(n_prompts=20), words=["cat", "antidisestablishmentarianism"])
    with pytest.raises(ConfigError, match="n_prompts"):
        DatasetConfig(n_prompts=3)
    with pytest.raises(ConfigError, match="anchors"):
        DatasetConfig(anchor_prob=0.3)
    with pytest.raises(TokenizationError, match="one token"):
        WordIndexDataset.generate(gpt2_tok, DatasetConfig(n_prompts=20, anchors=("&&&&x",), anchor_prob=0.5))
