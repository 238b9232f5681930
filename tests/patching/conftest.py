import pytest


@pytest.fixture(scope="session")
def tiny_probe(tiny_model, small_data):
    """A word-index probe at the tiny model's last layer (random weights: it reads what it can)."""
    from probing import WordIndexProbe, as_engine, collect_residuals

    acts = collect_residuals(tiny_model, small_data, layers=[1], progress=False)
    return WordIndexProbe(layer=1, model=as_engine(tiny_model).name).fit(acts.train(1), acts.labels["train"])


@pytest.fixture(scope="session")
def tiny_pairs(gpt2_tok, small_data):
    from patching import make_pairs

    return make_pairs(gpt2_tok, 6, vocab=small_data.vocab, seed=0)


@pytest.fixture
def tiny_ctx(tiny_model, tiny_pairs, tiny_probe):
    from patching import prepare

    return prepare(tiny_model, tiny_pairs, tiny_probe)
