import json

import pytest

from wordpos.circuit.cli import main


def test_probe_command_writes_metrics_config_and_plots(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["probe", "--model", str(tiny_gpt2_dir), "--layer", "all", "--out", str(out), "--n-prompts", "120",
                 "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("model", "layer", "accuracy", "baseline_abs_pos_accuracy", "per_word_accuracy", "per_layer_accuracy",
                "n_train", "n_test"):
        assert key in metrics
    assert set(metrics["per_layer_accuracy"]) == {"0", "1"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["seed"] == 0 and cfg["config"]["model"] == str(tiny_gpt2_dir)
    assert "torch" in cfg["versions"]
    assert (out / "key_plot.html").stat().st_size > 100_000  # plotly.js embedded: opens offline
    assert (out / "probe" / "probe.npz").exists()


def test_probe_refuses_another_runs_directory(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["probe", "--model", str(tiny_gpt2_dir), "--layer", "1", "--out", str(out), "--quiet"]
    assert main(args + ["--n-prompts", "60"]) == 0
    before = (out / "metrics.json").read_text()
    assert main(args + ["--n-prompts", "80"]) == 2
    assert "another run" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before  # nothing already written is lost
    assert main(args + ["--n-prompts", "60"]) == 0  # the same run again is reused
    assert main(args + ["--n-prompts", "80", "--overwrite"]) == 0


def test_probe_bad_layer_is_one_clear_line(tiny_gpt2_dir, tmp_path, capsys):
    assert main(["probe", "--model", str(tiny_gpt2_dir), "--layer", "7", "--out", str(tmp_path / "r"),
                 "--n-prompts", "40", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "0..1" in err


@pytest.mark.parametrize("model", ["no/such-model-here"])
def test_unknown_model(model, tmp_path, capsys, monkeypatch):
    from wordpos.probing.models import registry as M

    monkeypatch.setattr(M, "_hub_reachable", lambda timeout=3.0: False)
    assert main(["probe", "--model", model, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "cannot be had" in capsys.readouterr().err


def test_quiet_hides_the_libraries_bars_and_puts_back_the_callers_settings(tiny_gpt2_dir, tmp_path, capfd):
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    args = ["probe", "--model", str(tiny_gpt2_dir), "--layer", "1", "--n-prompts", "40"]
    try:
        hf_logging.enable_progress_bar()
        hub_utils.disable_progress_bars()  # a caller's own choice for the hub
        capfd.readouterr()
        assert main(args + ["--out", str(tmp_path / "a"), "--quiet"]) == 0
        assert "Loading weights" not in capfd.readouterr().err  # transformers' bar, hidden by --quiet
        assert hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert "Loading weights" in capfd.readouterr().err  # without --quiet the bar is there: the check above can fail
