import json
import warnings

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
def test_patch_command_writes_effects_and_heatmaps(tiny_gpt2_dir, probe_run, tmp_path, method, can_export_png):
    out = tmp_path / method
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["patch", "--model", str(tiny_gpt2_dir), "--probe", str(probe_run), "--method", method, "--out",
                     str(out), "--n-pairs", "6", "--n-random", "2", "--quiet"]) == 0
    meta = json.loads((out / "effects.json").read_text())
    assert meta["axes"][:2] == ["layer", "head"] and meta["method"] == method
    assert len(meta["top_heads"]) == 8
    res = EffectResult.load(out)
    assert res.effects.shape == (2, 4) and np.isfinite(res.effects).all() and meta["format"].endswith("/2")
    assert (out / "heads.html").exists()
    # the PNG when kaleido can render here (CI installs Chromium); else none, and a warning that names the fix
    assert (out / "heads.png").exists() == can_export_png
    said = [str(w.message) for w in caught if "PNG export skipped" in str(w.message)]
    assert (not said) if can_export_png else any("apt-get install chromium" in m for m in said)
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


def test_stages_sharing_a_memo_compute_roles_and_base_runs_once_with_the_same_results(tiny_gpt2_dir, probe_run,
                                                                                       tmp_path, monkeypatch):
    """``wordpos run`` passes one ``shared`` dict to its patching stages: the head roles, the patching context
    (base runs) and attribution patching are computed once, and every saved number equals that of stages run on
    their own."""
    import wordpos.patching.activation as act
    import wordpos.patching.attribution as attribution
    import wordpos.patching.roles as roles
    from wordpos.patching.experiment import PatchConfig, run_patching
    from wordpos.probing import load_model

    model = load_model(tiny_gpt2_dir, device="cpu")
    calls = {"prepare": 0, "roles": 0, "attribution": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(act, "prepare", counting("prepare", act.prepare))
    monkeypatch.setattr(roles, "head_roles", counting("roles", roles.head_roles))
    monkeypatch.setattr(attribution, "attribute_heads", counting("attribution", attribution.attribute_heads))
    import wordpos.patching.methods as methods
    monkeypatch.setattr(methods, "head_roles", roles.head_roles)
    methods_ = ("activation", "attribution", "path")
    kw = dict(model=str(tiny_gpt2_dir), probe=str(probe_run), n_pairs=6, seed=0, by_pos=False, screen="attribution")
    shared: dict = {}
    for m in methods_:
        run_patching(PatchConfig(method=m, **kw), tmp_path / "shared" / m, model=model, progress=False, shared=shared)
    assert calls == {"prepare": 1, "roles": 1, "attribution": 1}  # the screen's attribution serves all three
    for m in methods_:
        run_patching(PatchConfig(method=m, **kw), tmp_path / "alone" / m, model=model, progress=False)
    assert calls == {"prepare": 4, "roles": 4, "attribution": 4}
    for m in methods_:
        a, b = tmp_path / "shared" / m, tmp_path / "alone" / m
        assert json.loads((a / "roles.json").read_text()) == json.loads((b / "roles.json").read_text())
        assert np.array_equal(EffectResult.load(a).effects, EffectResult.load(b).effects)
