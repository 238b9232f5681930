"""Bad input found by an audit of the command line (one clear line naming the problem and the fix, exit 2, no
traceback, nothing already written lost), checked where the CLI meets it."""

import json

import pytest

from wordpos.circuit.cli import main


def _probe(model, out, *extra):
    return ["probe", "--model", str(model), "--layer", "1", "--out", str(out), "--n-prompts", "40", "--quiet",
            *extra]


def test_a_command_that_failed_on_its_settings_does_not_block_its_fix(tiny_gpt2_dir, tmp_path, capsys):
    """A run refused on a bad setting leaves only its config.json: the corrected command takes the directory."""
    out = tmp_path / "r"
    assert main(_probe(tiny_gpt2_dir, out, "--seed", "-1")) == 2
    assert "seed must be a non-negative integer" in capsys.readouterr().err
    assert main(_probe(tiny_gpt2_dir, out)) == 0
    assert (out / "metrics.json").exists()
    assert main(_probe(tiny_gpt2_dir, out, "--n-prompts", "60")) == 2  # a run with results is still protected
    assert "another run" in capsys.readouterr().err


def test_the_same_run_addressed_by_another_path_resumes(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    assert main(_probe(tiny_gpt2_dir, out)) == 0
    before = (out / "metrics.json").read_text()
    monkeypatch.chdir(tmp_path)
    for form in ("r", "./r", "r/"):
        assert main(_probe(tiny_gpt2_dir, form)) == 0, capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before


@pytest.mark.parametrize("device,says", [("cuda:3", "pass --device cpu"), ("nonsense", "unknown device"),
                                         ("meta", "holds no weights"), ("cuda:x", "unknown device")])
def test_a_device_this_machine_lacks_is_one_line(tiny_gpt2_dir, tmp_path, capsys, device, says, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_probe(tiny_gpt2_dir, tmp_path / "r", "--device", device)) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_cuda_index_past_the_last_device_is_named(monkeypatch):
    import torch

    from wordpos.probing import ConfigError
    from wordpos.probing.models.registry import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"2 CUDA device\(s\), cuda:0..cuda:1"):
        check_device("cuda:2")


@pytest.mark.parametrize("make", ["file", "under_file"])
def test_out_that_is_a_file_is_refused_and_kept(tiny_gpt2_dir, tmp_path, capsys, make):
    f = tmp_path / "afile.txt"
    f.write_text("keep me")
    out = f if make == "file" else f / "sub"
    assert main(_probe(tiny_gpt2_dir, out)) == 2
    err = capsys.readouterr().err
    assert ("is a file, not a directory" in err or "cannot write the run directory" in err) and "Traceback" not in err
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("flag,value,says", [("--C", "0", "C (the inverse regularisation"),
                                             ("--C", "-1", "must be a positive number"),
                                             ("--n-words", "1", "n_words must be at least 2"),
                                             ("--seed", "-3", "seed must be a non-negative")])
def test_probe_settings_out_of_range(tiny_gpt2_dir, tmp_path, capsys, flag, value, says):
    assert main(_probe(tiny_gpt2_dir, tmp_path / "r", flag, value)) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["{}", "not json", "[1, 2]"])
def test_a_model_directory_with_a_broken_config_is_named(tmp_path, capsys, text):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(text)
    (d / "model.safetensors").write_bytes(b"")
    assert main(_probe(d, tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(d) in err


def test_overwrite_leaves_no_layer_probe_of_the_run_it_replaced(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "r"
    assert main(["probe", "--model", str(tiny_gpt2_dir), "--layer", "all", "--out", str(out), "--n-prompts", "40",
                 "--quiet"]) == 0
    assert (out / "probes" / "layer0").exists()
    assert main(_probe(tiny_gpt2_dir, out, "--overwrite")) == 0
    layers = sorted(p.name for p in (out / "probes").iterdir()) if (out / "probes").exists() else []
    assert "layer0" not in layers
    assert json.loads((out / "metrics.json").read_text())["layer"] == 1


def test_overwrite_removes_only_what_the_replaced_run_wrote(tmp_path):
    """``--overwrite`` removes the replaced run's own outputs; a folder of the same name that was in the directory
    before the first run wrote into it is the user's and stays; a marker cannot point outside the run's names."""
    from wordpos.probing.io import RUN_MARKER, prepare_run_dir, remove_replaced_outputs

    out = tmp_path / "r"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "mine.pt").write_text("weights")
    outputs = ("probes", "checkpoint")
    prepare_run_dir(out, {"stage": "probe", "n": 1}, overwrite=True, outputs=outputs)  # written into: forced
    (out / "probes").mkdir()
    (out / "probes" / "layer0").write_text("probe")
    assert remove_replaced_outputs(out, "probe", outputs) == ["probes"]
    assert (out / "checkpoint" / "mine.pt").exists() and not (out / "probes").exists()
    prepare_run_dir(out, {"stage": "probe", "n": 2}, overwrite=True, outputs=outputs)
    assert json.loads((out / RUN_MARKER).read_text())["outputs"] == ["probes"]  # still not the user's folder
    record = json.loads((out / RUN_MARKER).read_text())
    (out / RUN_MARKER).write_text(json.dumps({**record, "outputs": ["..", "checkpoint", "probes"]}))
    assert remove_replaced_outputs(out, "probe", outputs) == ["checkpoint"]  # listed: removed; ".." never
    assert tmp_path.exists() and remove_replaced_outputs(out, "run", outputs) == []  # another stage's marker


def test_patch_results_for_a_probe_refitted_in_place_are_not_served_again(tiny_gpt2_dir, tmp_path, capsys):
    """The same `wordpos patch` command after its probe directory was re-fitted (another layer, same path): the
    saved results are for the old probe, so the stage refuses to resume and says how to recompute."""
    probe = tmp_path / "p"
    assert main(_probe(tiny_gpt2_dir, probe)) == 0
    patch = ["patch", "--model", str(tiny_gpt2_dir), "--probe", str(probe), "--method", "activation", "--out",
             str(tmp_path / "pa"), "--n-pairs", "4", "--quiet"]
    assert main(patch) == 0
    before = (tmp_path / "pa" / "summary.json").read_text()
    assert json.loads(before)["probe_sha256"]
    assert main(patch) == 0  # the same probe: resumed
    assert main(["probe", "--model", str(tiny_gpt2_dir), "--layer", "0", "--out", str(probe), "--n-prompts", "40",
                 "--quiet", "--overwrite"]) == 0
    assert main(patch) == 2
    err = capsys.readouterr().err
    assert "re-fitted since" in err and "--overwrite" in err
    assert (tmp_path / "pa" / "summary.json").read_text() == before  # nothing written is lost
    assert main(patch + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "pa" / "summary.json").read_text())["probe_layer"] == 0


@pytest.mark.parametrize("field", ["n_prompts", "n_pairs"])
def test_run_sizes_of_zero_are_refused_not_taken_as_the_default(field):
    from wordpos.circuit.pipeline import RunConfig
    from wordpos.probing import ConfigError

    with pytest.raises(ConfigError, match=f"{field} must be a positive integer"):
        RunConfig(model="organism", **{field: 0})
    assert getattr(RunConfig(model="organism").sized(2, 4), field) > 0  # None: sized to the model


def test_run_without_a_random_control_prints_its_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORDPOS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", "--model", "planted", "--out", str(out), "--n-prompts", "200", "--n-pairs", "4",
                 "--n-random", "0", "--circuit-n-random", "1", "--steps", "2", "--layer", "1", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "no random-head control (--n-random 0)" in said and (out / "report.html").exists()
    # and the same run addressed by a relative path resumes (the stages' probe paths are compared as absolute)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--model", "planted", "--out", "run", "--n-prompts", "200", "--n-pairs", "4",
                 "--n-random", "0", "--circuit-n-random", "1", "--steps", "2", "--layer", "1", "--quiet"]) == 0


@pytest.mark.parametrize("extra,says", [(["--top-k", "0"], "top-k is a number of edges"),
                                        (["--threshold", "-1"], "threshold is a minimum"),
                                        (["--keep", "0"], "keep is a share")])
def test_head_level_circuit_pruning_is_checked_before_any_stage_runs(tiny_gpt2_dir, tmp_path, capsys, extra, says,
                                                                      monkeypatch):
    from wordpos.patching import experiment

    ran = []
    monkeypatch.setattr(experiment, "run_patching", lambda *a, **k: ran.append(1))
    assert main(["circuit", "--head-level", "--model", str(tiny_gpt2_dir), "--probe", str(tmp_path / "p"), "--out",
                 str(tmp_path / "c"), "--quiet", *extra]) == 2
    assert says in capsys.readouterr().err and not ran


def test_a_resumed_patch_stage_with_a_damaged_effects_file_says_so(tiny_gpt2_dir, tmp_path, capsys):
    probe = tmp_path / "p"
    assert main(_probe(tiny_gpt2_dir, probe)) == 0
    patch = ["patch", "--model", str(tiny_gpt2_dir), "--probe", str(probe), "--method", "activation", "--out",
             str(tmp_path / "pa"), "--n-pairs", "4", "--quiet"]
    assert main(patch) == 0
    (tmp_path / "pa" / "effects.npz").write_bytes(b"")
    assert main(patch) == 2
    err = capsys.readouterr().err
    assert "effects.npz" in err and "Traceback" not in err
    assert main(patch + ["--overwrite"]) == 0
    assert (tmp_path / "pa" / "effects.npz").stat().st_size > 0


def test_a_run_moved_with_its_project_still_resumes(tmp_path, monkeypatch):
    """Stage configs keep paths as given (relative under a relative --out), so a run directory copied elsewhere
    resumes from its new place; the same place by an absolute path resumes too, another run is still refused."""
    import shutil

    from wordpos.probing.errors import RunDirError
    from wordpos.probing.io import prepare_run_dir

    config = {"stage": "patch", "probe": "runs/x/probe/probes/layer1", "n_pairs": 4}
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    prepare_run_dir("runs/x/patch", config)
    (tmp_path / "a" / "runs/x/patch/summary.json").write_text("{}")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    prepare_run_dir("runs/x/patch", config)  # moved: resumes
    prepare_run_dir(tmp_path / "b" / "runs/x/patch", {**config, "probe": str(tmp_path / "b" / config["probe"])})
    with pytest.raises(RunDirError, match="another run"):
        prepare_run_dir("runs/x/patch", {**config, "n_pairs": 8})
