import pytest


@pytest.fixture(scope="session")
def tiny_pairs(gpt2_tok, small_data):
    from wordpos.patching import make_pairs

    return make_pairs(gpt2_tok, 6, vocab=small_data.vocab, seed=0)


@pytest.fixture
def tiny_ctx(tiny_model, tiny_pairs, tiny_probe):
    from wordpos.patching import prepare

    return prepare(tiny_model, tiny_pairs, tiny_probe)
