"""The shipped organism: loads offline, is verified against its manifest, and a damaged copy is never used."""

import hashlib
import json
import shutil

import pytest

from wordpos.probing import CorruptFileError, load_model
from wordpos.probing.models import organism as O
from wordpos.probing.models.manifest import MANIFEST

SHIPPED = O.ASSET_DIR


def test_shipped_organism_is_verified_and_loads_offline():
    meta = O.verify(O.ASSET_DIR)
    assert meta["config"]["n_layer"] == 4 and "data_rule" in meta
    assert sum(p.stat().st_size for p in O.ASSET_DIR.iterdir()) < 8 * 2**20
    model = load_model("organism", device="cpu")
    assert model.cfg.n_layers == 4 and model.tokenizer.tokenize(" dramatisation") == ["Ġdram", "at", "isation"]


def _damaged_copy(tmp_path):
    bad = tmp_path / "organism"
    shutil.copytree(O.ASSET_DIR, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-100:] = bytes(255 - b for b in data[-100:])  # same size: only the sha256 can tell
    (bad / "model.safetensors").write_bytes(bytes(data))
    return bad


def test_shipped_manifest_is_the_shared_format():
    meta = json.loads((O.ASSET_DIR / MANIFEST).read_text())
    assert meta["format"] == "wordpos.model/1" and meta["name"] == "organism"
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        data = (O.ASSET_DIR / name).read_bytes()  # the records are the files' real sizes and hashes
        assert meta["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_damaged_copy_is_refused_with_the_rebuild_command(tmp_path, monkeypatch):
    bad = _damaged_copy(tmp_path)
    with pytest.raises(CorruptFileError, match=r"model\.safetensors does not match its sha256") as e:
        O.verify(bad)
    assert str(bad) in str(e.value) and "wordpos models pull organism --force" in str(e.value)
    monkeypatch.setenv("WORDPOS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(O, "train_organism", lambda *a, **k: pytest.fail("loading must never retrain"))
    with pytest.raises(CorruptFileError, match=r"(?s)sha256.*wordpos models pull organism --force.*No retrained copy"):
        O.organism_dir(shipped=bad)
    assert not (tmp_path / "cache" / "organism").exists()


@pytest.mark.parametrize("damage", ["no_manifest", "missing_file", "truncated"])
def test_partial_copies_are_refused(tmp_path, damage):
    bad = tmp_path / "organism"
    shutil.copytree(O.ASSET_DIR, bad)
    if damage == "no_manifest":
        (bad / MANIFEST).unlink()
    elif damage == "missing_file":
        (bad / "config.json").unlink()
    else:
        (bad / "model.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(CorruptFileError, match="wordpos models pull organism --force"):
        O.verify(bad)


def test_legacy_organism_manifest_is_read(tmp_path):
    """The first organism layout (wordpos_organism.json, format wordpos.organism/1, records {sha256, bytes}),
    as a copy retrained by an older wordpos has it, still verifies."""
    old = tmp_path / "organism"
    shutil.copytree(O.ASSET_DIR, old)
    meta = json.loads((old / MANIFEST).read_text())
    legacy = {"format": "wordpos.organism/1", "config": meta["config"], "data_rule": meta["data_rule"],
              "files": {n: {"sha256": r["sha256"], "bytes": r["size"]} for n, r in meta["files"].items()}}
    (old / MANIFEST).unlink()
    (old / O.LEGACY_MANIFEST).write_text(json.dumps(legacy))
    assert O.verify(old)["config"]["n_layer"] == 4
    (old / "model.safetensors").write_bytes(b"\0" * meta["files"]["model.safetensors"]["size"])
    with pytest.raises(CorruptFileError, match="sha256"):
        O.verify(old)


def test_pull_retrains_into_the_cache_and_the_copy_is_used(tmp_path, monkeypatch):
    """``pull_organism`` is the rebuild the errors name: it trains into the cache atomically; with the shipped
    copy damaged, loading then uses the retrained one (training is faked by copying the shipped files)."""
    bad = _damaged_copy(tmp_path)
    monkeypatch.setenv("WORDPOS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(O, "ASSET_DIR", bad)
    calls = []

    def fake_train(out, *a, **k):
        calls.append(out)
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(SHIPPED / name, out / name)
        O.manifest.write_manifest(out, name="organism", source="test", config={"n_layer": 4})

    monkeypatch.setattr(O, "train_organism", fake_train)
    assert O.pull_organism(progress=False) == tmp_path / "cache" / "organism" and len(calls) == 1
    assert O.organism_dir() == tmp_path / "cache" / "organism"
    assert O.pull_organism(progress=False) == tmp_path / "cache" / "organism" and len(calls) == 1  # whole: reused
    O.pull_organism(force=True, progress=False)
    assert len(calls) == 2
    (tmp_path / "cache" / "organism" / "config.json").write_text("{}")  # the retrained copy damaged too: refused
    with pytest.raises(CorruptFileError, match=r"(?s)organism.*config\.json.*pull organism --force"):
        O.organism_dir()


def test_corpus_is_seeded_and_segments_like_gpt2(gpt2_tok):
    a = O.Corpus(gpt2_tok, O.OrganismConfig(seed=3)).batch(4, 63)
    b = O.Corpus(gpt2_tok, O.OrganismConfig(seed=3)).batch(4, 63)
    assert (a == b).all()
    seq = O.Corpus(gpt2_tok, O.OrganismConfig(seed=4, prefix_prob=0.0)).sequence(200)
    line = seq[1:seq.index(gpt2_tok.encode(".")[0]) + 1]
    assert gpt2_tok.encode(gpt2_tok.decode(line)) == line  # built from word tokens == tokenizing the text
    words = gpt2_tok.decode(line).split()[1:]
    assert 4 <= len(words) <= 8
