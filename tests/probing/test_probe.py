import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from wordpos.probing import ConfigError, CorruptFileError, WordIndexProbe


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, size=400)
    X = centers[y] + rng.normal(size=(400, 16)) + 5.0  # offset and scale exercise the standardisation fold
    X[:, 0] *= 40
    return X.astype(np.float32), y


def test_estimator_api(blobs):
    X, y = blobs
    probe = WordIndexProbe(C=0.5)
    assert clone(probe).get_params()["C"] == 0.5
    with pytest.raises(NotFittedError):
        probe.predict(X)
    assert probe.fit(X, y) is probe
    assert probe.score(X, y) > 0.95
    assert probe.predict_proba(X).shape == (400, 4)
    assert probe.directions_.shape == (4, 16)


def test_directions_in_residual_basis_reproduce_decision_function(blobs):
    X, y = blobs
    probe = WordIndexProbe().fit(X, y)
    ours = probe.logits(torch.from_numpy(X)).double().numpy()
    assert np.allclose(ours, probe.decision_function(X), atol=1e-3)


def test_save_load_round_trip(blobs, tmp_path):
    X, y = blobs
    probe = WordIndexProbe(layer=3, model="m").fit(X, y)
    probe.save(tmp_path / "p")
    loaded = WordIndexProbe.load(tmp_path / "p")
    assert loaded.layer == 3 and loaded.model == "m"
    assert np.array_equal(loaded.predict(X), probe.predict(X))
    assert torch.allclose(loaded.directions_, probe.directions_)


def test_corrupt_or_foreign_probe_files(blobs, tmp_path):
    X, y = blobs
    WordIndexProbe().fit(X, y).save(tmp_path / "p")
    (tmp_path / "p" / "probe.npz").write_bytes(b"truncated")
    with pytest.raises(CorruptFileError, match="probe weights"):
        WordIndexProbe.load(tmp_path / "p")
    (tmp_path / "p" / "probe.json").write_text('{"format": "something else"}')
    with pytest.raises(CorruptFileError, match="not a wordpos probe"):
        WordIndexProbe.load(tmp_path / "p")


def test_shape_and_compatibility_errors(blobs):
    X, y = blobs
    probe = WordIndexProbe(layer=1, model="organism").fit(X, y)
    with pytest.raises(ConfigError, match="shape"):
        probe.predict(X[:, :8])
    with pytest.raises(ConfigError, match="another model"):
        probe.check_compatible("organism", d_model=32)
    with pytest.raises(ConfigError, match="fitted on model"):
        probe.check_compatible("gpt2")
    with pytest.raises(ConfigError, match="layer"):
        probe.check_compatible("organism", layer=2)
    with pytest.raises(ConfigError, match="labels"):
        WordIndexProbe().fit(X, y[:10])
