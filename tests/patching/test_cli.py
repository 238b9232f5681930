import json

import numpy as np
import pytest

from wordpos.circuit.cli import main
from wordpos.patching.results import EffectResult
from wordpos.probing import CorruptFileError


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
    assert res.effects.shape == (2, 4) and np.isfinite(res.effects).all() and meta["format"].endswith("/2")
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


def test_probe_option_accepts_a_wordpos_run_directory(tiny_gpt2_dir, probe_run, tmp_path):
    """`wordpos run` keeps its probe stage in RUN/probe (best probe in RUN/probe/probe): --probe RUN works and
    reads the probe stage's own word split."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(probe_run, run / "probe")
    out = tmp_path / "patch"
    assert main(["patch", "--model", str(tiny_gpt2_dir), "--probe", str(run), "--out", str(out), "--n-pairs", "4",
                 "--no-by-pos", "--quiet"]) == 0
    assert EffectResult.load(out).effects.shape == (2, 4)
    assert json.loads((out / "summary.json").read_text())["sizing"]["candidates"] == 16


def test_ablation_stage_stores_unmeasured_heads_as_nan(tiny_gpt2_dir, probe_run, tmp_path):
    out = tmp_path / "ablation"
    assert main(["patch", "--model", str(tiny_gpt2_dir), "--probe", str(probe_run), "--method", "ablation", "--out",
                 str(out), "--n-random", "1", "--n-prompts", "60", "--quiet"]) == 0
    res = EffectResult.load(out)
    assert res.direction == "ablation" and np.isfinite(res.effects).all()  # 8 heads <= 16 candidates: all measured
    clean = res.config["unpatched"]
    assert np.allclose(res.extra["level"] - clean, res.effects)
    summary = json.loads((out / "summary.json").read_text())
    worst = min(res.effects.ravel())
    assert summary["top_heads"][0]["effect"] == pytest.approx(worst)  # ranked by the largest drop
