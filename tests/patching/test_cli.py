import json

import numpy as np
import pytest

from circuit.cli import main
from patching.results import EffectResult
from probing import CorruptFileError


@pytest.fixture(scope="module")
def probe_run(tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-run")
    assert main(["probe", "--model", str(tiny_gpt2_dir), "--layer", "1", "--out", str(out), "--n-prompts", "120",
                 "--quiet"]) == 0
    return out


@pytest.mark.parametrize("method", ["activation", "path", "attribution", "ablation"])
def test_patch_command_writes_effects_and_heatmaps(tiny_gpt2_dir, probe_run, tmp_path, method):
    out = tmp_path / method
    assert main(["patch", "--model", str(tiny_gpt2_dir), "--probe", str(probe_run), "--method", method, "--out",
                 str(out), "--n-pairs", "6", "--n-random", "2", "--quiet"]) == 0
    meta = json.loads((out / "effects.json").read_text())
    assert meta["axes"][:2] == ["layer", "head"] and meta["method"] == method
    assert len(meta["top_heads"]) == 8
    res = EffectResult.load(out)
    assert res.effects.shape == (2, 4) and np.isfinite(res.effects).all()
    assert (out / "heads.html").exists() and (out / "heads.png").exists()
    assert "config" in json.loads((out / "config.json").read_text())


def test_corrupt_effects_file_is_reported(tmp_path):
    EffectResult(np.zeros((2, 3)), ("layer", "head"), "activation", "m").save(tmp_path)
    (tmp_path / "effects.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CorruptFileError, match="truncated or not ours"):
        EffectResult.load(tmp_path)


def test_probe_from_another_model_is_refused(tiny_gpt2_dir, probe_run, tmp_path, capsys):
    assert main(["patch", "--model", "organism", "--probe", str(probe_run), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "fitted on" in capsys.readouterr().err


def test_missing_probe_is_reported(tmp_path, capsys):
    assert main(["patch", "--probe", str(tmp_path), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "no probe at" in capsys.readouterr().err
