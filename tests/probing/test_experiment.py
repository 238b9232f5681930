"""The probe stage resumes after an interruption: saved residuals and fitted layers are reused."""

import json

import pytest

import wordpos.probing.evaluation as evaluation
import wordpos.probing.experiment as experiment
from wordpos.probing.experiment import ProbeConfig, run_probe


def test_interrupted_probe_stage_resumes_without_recomputing(tiny_model, tiny_gpt2_dir, tmp_path, monkeypatch):
    cfg = ProbeConfig(model=str(tiny_gpt2_dir), layers="all", n_prompts=100)
    out = tmp_path / "run"

    def crash(*a, **k):
        raise KeyboardInterrupt("interrupted while plotting")

    monkeypatch.setattr(experiment, "CHECKPOINT_WRITE_BYTES_PER_S", 1e30)  # writing costs nothing: checkpoint
    monkeypatch.setattr(experiment, "save_probe_plots", crash)
    with pytest.raises(KeyboardInterrupt):
        run_probe(cfg, out, model=tiny_model, progress=False)
    assert not (out / "metrics.json").exists()
    assert (out / "checkpoint" / "residuals" / "residuals.json").exists()
    assert {p.name for p in (out / "checkpoint" / "layers").iterdir()} == {"layer0", "layer1"}
    monkeypatch.undo()

    def no_collection(*a, **k):
        raise AssertionError("residuals were collected again")

    fits = []
    real = evaluation.evaluate_layer
    monkeypatch.setattr(experiment, "collect_residuals", no_collection)
    monkeypatch.setattr(evaluation, "evaluate_layer", lambda *a, **k: fits.append(a[1]) or real(*a, **k))
    run = run_probe(cfg, out, model=tiny_model, progress=False)
    assert len(fits) == 1  # only the shuffled-label control at the best layer; no layer is refitted
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_layer_accuracy"]) == {"0", "1"} and metrics == json.loads(json.dumps(run.metrics))
    assert not (out / "checkpoint").exists()  # removed when the stage finishes


def test_uninterrupted_run_matches_a_resumed_one(tiny_model, tiny_gpt2_dir, tmp_path, monkeypatch):
    cfg = ProbeConfig(model=str(tiny_gpt2_dir), layers="1", n_prompts=100, keep_residuals=True)
    a = run_probe(cfg, tmp_path / "a", model=tiny_model, progress=False, plots=False)
    assert (tmp_path / "a" / "checkpoint" / "residuals" / "residuals.json").exists()  # kept on request
    monkeypatch.setattr(experiment, "save_probe_plots", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_probe(cfg, tmp_path / "b", model=tiny_model, progress=False)
    monkeypatch.undo()
    b = run_probe(cfg, tmp_path / "b", model=tiny_model, progress=False, plots=False)
    assert b.metrics["accuracy"] == a.metrics["accuracy"]
    assert b.metrics["per_layer_accuracy"] == a.metrics["per_layer_accuracy"]


def test_residuals_are_not_checkpointed_when_recomputing_is_cheaper(tiny_model, tiny_gpt2_dir, tmp_path, monkeypatch):
    """A disk slower than the collection: no residual checkpoint is written, and a resumed stage collects again."""
    cfg = ProbeConfig(model=str(tiny_gpt2_dir), layers="all", n_prompts=100)
    out = tmp_path / "run"
    monkeypatch.setattr(experiment, "CHECKPOINT_WRITE_BYTES_PER_S", 1.0)
    monkeypatch.setattr(experiment, "save_probe_plots", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_probe(cfg, out, model=tiny_model, progress=False)
    assert not (out / "checkpoint" / "residuals").exists()
    assert {p.name for p in (out / "checkpoint" / "layers").iterdir()} == {"layer0", "layer1"}  # fits are kept
    monkeypatch.undo()
    calls = []
    real = experiment.collect_residuals
    monkeypatch.setattr(experiment, "collect_residuals", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = run_probe(cfg, out, model=tiny_model, progress=False, plots=False)
    assert calls == [1] and {str(k) for k in run.metrics["per_layer_accuracy"]} == {"0", "1"}
