"""The shipped organism: loads offline, is verified against its manifest, and a damaged copy is never used."""

import shutil

import pytest

from probing import CorruptFileError, load_model
from probing import organism as O


def test_shipped_organism_is_verified_and_loads_offline():
    meta = O.verify(O.ASSET_DIR)
    assert meta["config"]["n_layer"] == 4 and "data_rule" in meta
    assert sum(p.stat().st_size for p in O.ASSET_DIR.iterdir()) < 8 * 2**20
    model = load_model("organism", device="cpu")
    assert model.cfg.n_layers == 4 and model.tokenizer.tokenize(" dramatisation") == ["Ġdram", "at", "isation"]


def test_corrupt_copy_is_refused_or_retrained(tmp_path, monkeypatch):
    bad = tmp_path / "organism"
    shutil.copytree(O.ASSET_DIR, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-100:] = b"\x00" * 100
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="sha256"):
        O.verify(bad)
    monkeypatch.setenv("WORDPOS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CorruptFileError, match="retrain"):
        O.organism_dir(shipped=bad, retrain=False)
    calls = []
    monkeypatch.setattr(O, "train_organism", lambda out, *a, **k: calls.append(out) or shutil.copytree(
        O.ASSET_DIR, out, dirs_exist_ok=True))
    path = O.organism_dir(shipped=bad)
    assert calls and path == tmp_path / "cache" / "organism"
    O.verify(path)


def test_corpus_is_seeded_and_segments_like_gpt2(gpt2_tok):
    a = O.Corpus(gpt2_tok, O.OrganismConfig(seed=3)).batch(4, 63)
    b = O.Corpus(gpt2_tok, O.OrganismConfig(seed=3)).batch(4, 63)
    assert (a == b).all()
    seq = O.Corpus(gpt2_tok, O.OrganismConfig(seed=4, prefix_prob=0.0)).sequence(200)
    line = seq[1:seq.index(gpt2_tok.encode(".")[0]) + 1]
    assert gpt2_tok.encode(gpt2_tok.decode(line)) == line  # built from word tokens == tokenizing the text
    words = gpt2_tok.decode(line).split()[1:]
    assert 4 <= len(words) <= 8
