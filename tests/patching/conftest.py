import pytest
import torch


@pytest.fixture(scope="session")
def tiny_pairs(gpt2_tok, small_data):
    from wordpos.patching import make_pairs

    return make_pairs(gpt2_tok, 6, vocab=small_data.vocab, seed=0)


@pytest.fixture
def tiny_ctx(tiny_model, tiny_pairs, tiny_probe):
    from wordpos.patching import prepare

    return prepare(tiny_model, tiny_pairs, tiny_probe)


@pytest.fixture(scope="session")
def tiny_llama_ctx(tmp_path_factory, gpt2_tok, small_data, tiny_pairs):
    """``make(seed) -> (model, ctx)``: a new tiny GQA Llama (2 layers, 4 query / 2 key-value heads, RoPE; other
    depths and widths by keyword) in float64 with a probe at its last layer. Random weights give the probe a small clean-corrupted span, so float32 noise would show
    at 1e-5 in normalised units; each call builds its own model, so no test module shares another's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from wordpos.patching import prepare
    from wordpos.probing import WordIndexProbe, as_engine, collect_residuals, load_model

    def make(seed: int, n_layers: int = 2, hidden: int = 64, intermediate: int = 96):
        path = tmp_path_factory.mktemp(f"tiny-llama-{seed}")
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(gpt2_tok), hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).eval().save_pretrained(path)
        gpt2_tok.save_pretrained(path)
        model = load_model(path, device="cpu")
        L = n_layers - 1
        acts = collect_residuals(model, small_data, layers=[L], progress=False)
        probe = WordIndexProbe(layer=L, model=as_engine(model).name).fit(acts.train(L), acts.labels["train"])
        model.to(torch.float64)
        return model, prepare(model, tiny_pairs, probe)

    return make


@pytest.fixture(scope="module")
def llama_ctx(tiny_llama_ctx):
    return tiny_llama_ctx(1)


@pytest.fixture(scope="module")
def gpt2_ctx(tiny_gpt2_dir, tiny_pairs, tiny_probe):
    """The tiny random GPT-2 in float64, a copy per test module (the session's float32 model is left alone)."""
    from wordpos.patching import prepare
    from wordpos.probing import load_model

    model = load_model(tiny_gpt2_dir, device="cpu")
    model.to(torch.float64)
    return model, prepare(model, tiny_pairs, tiny_probe)
