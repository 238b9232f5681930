"""Models shared by the engine-level tests: a tiny grouped-query Llama (RoPE) and the tiny GPT-2, in float64, and
the Llama in float32."""

import pytest
import torch

from wordpos.probing import load_model


def _tiny(tmp_path_factory, gpt2_tok, name: str, seed: int, n_layers: int):
    """A tiny grouped-query model of ``name``'s Llama-like block (4 query / 2 key-value heads, d_model 64), saved."""
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=len(gpt2_tok), hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp(f"lean-{name.lower()}")
    getattr(transformers, f"{name}ForCausalLM")(cfg).eval().save_pretrained(path)
    gpt2_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, gpt2_tok):
    return _tiny(tmp_path_factory, gpt2_tok, "Llama", 3, 3)


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, gpt2_tok):
    """Llama's block with q/k/v biases (Qwen2)."""
    return _tiny(tmp_path_factory, gpt2_tok, "Qwen2", 4, 2)


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama-float32", "qwen2"])
def model(request, tiny_gpt2_dir, tiny_llama_dir, tiny_qwen2_dir):
    """float64, and the Llama also in float32: there the lean blocks take the fused attention kernel (with
    grouped-query heads), in float64 Hugging Face's float32 softmax."""
    path = {"gpt2": tiny_gpt2_dir, "qwen2": tiny_qwen2_dir}.get(request.param, tiny_llama_dir)
    m = load_model(path, device="cpu")
    return m if request.param.endswith("float32") else m.to(torch.float64)
