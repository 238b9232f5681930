import time

import pytest
import torch

from probing import ConfigError, ModelNotAvailableError, load_model
from probing import models as M


def test_local_dir_loads_as_bridge_and_matches_hf(tiny_gpt2_dir, tiny_model, gpt2_tok):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    toks = torch.tensor([gpt2_tok.encode("Hello world. When the cat sat")])
    with torch.no_grad():
        ours = tiny_model(toks)
        ref = hf(toks).logits
    assert type(tiny_model).__name__ == "TransformerBridge"
    assert (ours - ref).abs().max() < 1e-4
    assert tiny_model.cfg.n_layers == 2 and tiny_model.cfg.n_heads == 4


def test_unknown_hub_model_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setattr(M, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="organism"):
        load_model("gpt2")
    assert time.perf_counter() - t0 < 5


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        load_model(tmp_path)


def test_bad_dtype_string(tiny_gpt2_dir):
    with pytest.raises(ConfigError, match="dtype"):
        load_model(tiny_gpt2_dir, dtype="float33")


def test_gpt2_family_gets_offline_tokenizer_when_none_is_saved(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert M._needs_gpt2_tokenizer(tmp_path)
    assert M._needs_gpt2_tokenizer("gpt2-medium")
    assert not M._needs_gpt2_tokenizer("EleutherAI/pythia-70m")
