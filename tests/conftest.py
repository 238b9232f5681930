"""Shared fixtures: a tiny random GPT-2 saved as a Hugging Face directory (the exact path `gpt2` takes),
the offline GPT-2 tokenizer, and small datasets. Everything runs on CPU in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def gpt2_tok():
    from wordpos.probing.models.tokenizers import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tok):
    """A 2-layer, 4-head, d_model 64 GPT-2 with random weights, written by save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=len(gpt2_tok),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    gpt2_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_gpt2_dir):
    from wordpos.probing import load_model

    return load_model(tiny_gpt2_dir, device="cpu")


@pytest.fixture(scope="session")
def small_data(gpt2_tok):
    from wordpos.probing import WordIndexDataset

    return WordIndexDataset.default(gpt2_tok, n_prompts=200, seed=0)


@pytest.fixture(scope="session")
def can_export_png(tmp_path_factory) -> bool:
    """Whether kaleido renders static images on this machine (it needs a Chrome/Chromium: CI installs one, a
    fresh machine may lack it). Tested by exporting a one-point figure through plotly itself, not wordpos."""
    import plotly.graph_objects as go
    import plotly.io as pio

    path = tmp_path_factory.mktemp("png-probe") / "probe.png"
    try:  # the call wordpos makes (probing.plots._write_images): a batch, with sizes and scales
        pio.write_images([go.Figure(go.Scatter(x=[0], y=[0]))], [str(path)], format="png", scale=[2.0], width=[700],
                         height=[500])
    except Exception:  # kaleido without a browser, ...
        return False
    return path.exists() and path.stat().st_size > 0


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point wordpos' model cache at an empty temporary directory."""
    monkeypatch.setenv("WORDPOS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def planted_model(tmp_path_factory):
    """The planted-circuit model, built into a session cache directory and loaded as a TransformerBridge."""
    import os

    from wordpos.probing import load_model

    old = os.environ.get("WORDPOS_CACHE")
    os.environ["WORDPOS_CACHE"] = str(tmp_path_factory.mktemp("planted-cache"))
    try:
        model = load_model("planted", device="cpu")
    finally:
        if old is None:
            os.environ.pop("WORDPOS_CACHE")
        else:
            os.environ["WORDPOS_CACHE"] = old
    return model


@pytest.fixture(scope="session")
def planted_data(planted_model):
    from wordpos.probing import WordIndexDataset

    return WordIndexDataset.default(planted_model.tokenizer, n_prompts=600, seed=0)


@pytest.fixture(scope="session")
def planted_probe(planted_model, planted_data):
    from wordpos.probing import WordIndexProbe, as_engine, collect_residuals

    acts = collect_residuals(planted_model, planted_data, layers=[1], progress=False)
    return WordIndexProbe(layer=1, model=as_engine(planted_model).name).fit(acts.train(1), acts.labels["train"])


@pytest.fixture(scope="session")
def planted_ctx(planted_model, planted_data, planted_probe):
    from wordpos.patching import make_pairs, prepare

    pairs = make_pairs(planted_model.tokenizer, 12, vocab=planted_data.vocab, seed=0)
    return prepare(planted_model, pairs, planted_probe)


@pytest.fixture(scope="session")
def tiny_probe(tiny_model, small_data):
    """A word-index probe at the tiny model's last layer (random weights: it reads what it can)."""
    from wordpos.probing import WordIndexProbe, as_engine, collect_residuals

    acts = collect_residuals(tiny_model, small_data, layers=[1], progress=False)
    return WordIndexProbe(layer=1, model=as_engine(tiny_model).name).fit(acts.train(1), acts.labels["train"])
