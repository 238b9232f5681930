"""`wordpos run` and `wordpos circuit` end to end on the planted model (small sizes), plus re-runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wordpos.circuit.cli import main
from wordpos.circuit.export import load_graph
from wordpos.probing.models.planted import PLANTED

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    import os

    os.environ.setdefault("WORDPOS_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("run") / "planted"
    args = ["run", "--model", "planted", "--out", str(out), "--n-prompts", "300", "--n-pairs", "8", "--n-random", "3",
            "--layer", "1", "--quiet"]
    assert main(args) == 0
    return out, args


def test_run_writes_report_summary_and_circuit(planted_run):
    out, _ = planted_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe"]["accuracy"] > summary["probe"]["baseline_abs_pos_accuracy"] + 0.3
    assert summary["patched_layer"] == 1
    assert summary["top_heads"]["activation"][0]["head"] == "{}.{}".format(*PLANTED.counter)
    circ = summary["circuit"]
    # the edge circuit: the planted heads, reached under counterfactual ablation, well above random circuits
    assert sorted(circ["heads"]) == PLANTED.circuit_heads
    assert circ["reached"] and circ["faithfulness"]["share"] >= 0.8 and circ["ablation"] == "counterfactual"
    assert circ["cpr"] > circ["random_cpr"] + 0.2 and circ["cpr_ci"][0] <= circ["cpr"] <= circ["cpr_ci"][1]
    assert set(summary["timings_s"]) >= {"probe (all layers)", "activation patching", "circuit", "report"}
    report = (out / "report.html").read_text()
    assert report.count('class="plotly-graph-div"') >= 8 and "Top heads" in report and "CPR" in report
    G = load_graph(out / "circuit" / "graph.graphml")
    assert G.graph["model"] == "planted"
    for f in ("graph.json", "graph.gexf", "graph.dot", "circuit.html", "curve.json", "curve.html"):
        assert (out / "circuit" / f).exists(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["seed"] == 0 and "transformer-lens" in cfg["versions"]
    # attention evidence for the heads found: the planted counter reads as the hypothesis' 3-vs-1 pattern
    att = summary["attention"]["heads"]
    assert set(att) >= set(PLANTED.circuit_heads)
    assert att["0.2"]["anchor_vs_space_logit"] == pytest.approx(2.0, abs=1e-3)
    assert (out / "attention" / "patterns.html").exists() and "Attention evidence" in report


def _newplot_args(page: str) -> list[list]:
    """The (data, layout, config) JSON of every ``Plotly.newPlot`` call in an HTML page, in order."""
    dec, out, i = json.JSONDecoder(), [], 0
    while (i := page.find("Plotly.newPlot(", i)) >= 0:
        j = page.index(",", i) + 1  # past the div id
        args = []
        for _ in range(3):
            while page[j] in " \n,":
                j += 1
            obj, j = dec.raw_decode(page, j)
            args.append(obj)
        out.append(args)
        i = j
    return out


def test_report_embeds_each_figure_as_plotly_would(planted_run):
    """The report embeds each saved figure from its JSON without rebuilding a validated Figure: the figures it
    draws equal what plotly makes of ``plotly.io.read_json`` (a validated Figure), and plotly.js is embedded once."""
    import plotly.io as pio

    from wordpos.circuit.report import FIGURES, REPORT_CONFIG

    out, _ = planted_run
    report = (out / "report.html").read_text(encoding="utf-8")
    ref = "".join(pio.to_html(pio.read_json(out / f"{stem}.plotly.json"), include_plotlyjs=False, full_html=False,
                              config=REPORT_CONFIG)
                  for stem, _ in FIGURES if (out / f"{stem}.plotly.json").exists())
    got, want = _newplot_args(report), _newplot_args(ref)
    assert len(want) >= 8 and got == want
    assert report.count("plotly.js v") == 1


def test_rerun_reuses_finished_stages(planted_run):
    out, args = planted_run
    before = {p: p.stat().st_mtime_ns for p in [out / "probe" / "metrics.json", out / "patch_path" / "effects.npz"]}
    first = json.loads((out / "summary.json").read_text())["compute_s"]
    assert main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    again = json.loads((out / "summary.json").read_text())
    # reused stages keep the cost they had when computed; this invocation's own timings are near zero
    assert again["compute_s"]["probe (all layers)"] == first["probe (all layers)"] > 0
    assert again["timings_s"]["probe (all layers)"] < first["probe (all layers)"]


def test_a_run_saved_before_a_speed_setting_was_added_still_resumes(planted_run):
    """``config.json`` records the run's identity; a run directory written before ``Sizing.accelerator_prompts``
    existed (its identity without that key) is the same run, and a different value of it is the same run too."""
    from wordpos.circuit.pipeline import RunConfig
    from wordpos.patching.sizing import Sizing
    from wordpos.probing.io import RUN_MARKER

    out, args = planted_run
    marker = out / RUN_MARKER
    saved = json.loads(marker.read_text())
    assert "accelerator_prompts" not in saved["config"]["sizing"] and "prompt_batch" in saved["config"]["sizing"]
    assert RunConfig(model="m", sizing=Sizing(accelerator_prompts=7)).identity() == RunConfig(model="m").identity()
    assert main(args) == 0  # resumes


def test_run_refuses_another_runs_directory(planted_run, capsys):
    out, args = planted_run
    other = [a if a != "300" else "400" for a in args]
    assert main(other) == 2
    assert "another run" in capsys.readouterr().err


def test_overwrite_replaces_the_whole_run(planted_run, tmp_path):
    """``run --overwrite`` over an earlier run leaves none of its files behind (here a stale file in a stage's
    folder and a checkpoint) to be read as the new run's; files the run did not write stay."""
    import shutil

    src, args = planted_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    (out / "circuit" / "head_graph_from_an_older_run.json").write_text("{}")
    (out / "checkpoints" / "stale").mkdir(parents=True, exist_ok=True)
    (out / "my_notes.txt").write_text("mine")
    again = [str(out) if a == str(src) else a for a in args]
    assert main(again + ["--overwrite"]) == 0
    assert not (out / "circuit" / "head_graph_from_an_older_run.json").exists()
    assert not (out / "checkpoints" / "stale").exists()
    assert (out / "my_notes.txt").read_text() == "mine"
    assert (out / "circuit" / "circuit.json").exists() and (out / "report.html").exists()
    new, old = (json.loads((d / "summary.json").read_text())["circuit"] for d in (out, src))
    same = lambda c: {k: v for k, v in c.items() if k not in ("files", "timings_s")}  # noqa: E731 - paths, seconds
    assert same(new) == same(old)  # the same settings give the same circuit


def test_overwrite_with_a_refused_setting_keeps_the_run(planted_run, tmp_path, capsys):
    """Settings refused later in the run (a layer the model lacks, too few prompts) are refused before the
    replaced run's outputs are removed: a typo with --overwrite loses nothing."""
    import shutil

    src, args = planted_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    base = [str(out) if a == str(src) else a for a in args]
    for bad in (["--layer", "7"], ["--n-prompts", "5"]):
        assert main(_with(base, bad) + ["--overwrite"]) == 2
        assert "out of range" in capsys.readouterr().err or bad[0] == "--n-prompts"
        assert (out / "circuit" / "circuit.json").exists() and (out / "summary.json").exists()


def _with(args: list[str], extra: list[str]) -> list[str]:
    """``args`` with ``extra``'s option values replacing theirs."""
    args = list(args)
    for k in range(0, len(extra), 2):
        args[args.index(extra[k]) + 1] = extra[k + 1]
    return args


def test_export_script(planted_run, tmp_path):
    out, _ = planted_run
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_circuit.py"), str(out), "--formats",
                           "gexf,dot,html", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert load_graph(tmp_path / "graph.dot").number_of_nodes() == load_graph(out / "circuit" / "graph.json").number_of_nodes()
    assert (tmp_path / "graph.html").exists()


def test_circuit_command_with_threshold(planted_run, tmp_path, capsys):
    out, _ = planted_run
    assert main(["circuit", "--model", "planted", "--probe", str(out / "probe"), "--out", str(tmp_path / "c"),
                 "--threshold", "0.2", "--n-pairs", "8", "--quiet"]) == 0
    assert "faithfulness" in capsys.readouterr().out
    assert main(["circuit", "--model", "planted", "--probe", str(out / "probe"), "--out", str(tmp_path / "d"),
                 "--threshold", "50", "--n-pairs", "8", "--quiet"]) == 2
    assert "leaves no edge" in capsys.readouterr().err


def test_run_on_the_accelerators_paths_matches_the_cpus(planted_run, tmp_path, monkeypatch):
    """`wordpos run` through the code an accelerator takes, on the CPU: free memory reported (residuals kept as
    tensors, all layers fitted in one group, predictions batched over layers), the batched preconditioned L-BFGS for
    every probe fit and refit (the refits of all random sets in one fit), the hook-free route for head edits and the
    accelerator's batch sizes. Each of those
    paths runs, and the run reads as the CPU path's (same patched layer, top head, circuit heads; accuracies within
    solver tolerance): the GPU's code, exercised where CI runs."""
    import wordpos.probing.engines.memory as memory
    import wordpos.probing.evaluation as evaluation
    import wordpos.probing.probe as probe
    from wordpos.patching import lean_route, runner, sizing

    used = {"batched": 0, "preconditioned": 0, "refits_in_one_fit": 0, "predictions": 0, "lean": 0}
    solver, predictions, lean = probe.batched_lbfgs_logreg, evaluation.layer_predictions, lean_route.lean_run
    fit = probe.fit_probes

    def counted_fit(X, *a, layers=None, **kw):
        # the ablation's refits: every distinct set in one fit (one layer, several sets), as on an accelerator (the
        # planted run's random sets are not all identical, so at least two are fitted together)
        used["refits_in_one_fit"] += layers is not None and len(layers) > 1 and len(set(layers)) == 1
        return fit(X, *a, layers=layers, **kw)

    def batched(Z, *a, **kw):
        used["batched"] += 1
        used["preconditioned"] += kw.get("precondition") is not False and Z.shape[2] + 1 <= 2 * Z.shape[1]
        return solver(Z, *a, **kw)

    def counted_predictions(*a, **kw):
        out = predictions(*a, **kw)
        used["predictions"] += out is not None
        return out

    def counted_lean(*a, **kw):
        out = lean(*a, **kw)
        used["lean"] += out is not None
        return out

    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 8 << 30)
    monkeypatch.setattr(probe, "batched_lbfgs_logreg", batched)
    monkeypatch.setattr(probe, "auto_optimizer", lambda device: "batched")
    monkeypatch.setattr(probe, "fit_probes", counted_fit)
    monkeypatch.setattr(evaluation, "fit_probes", counted_fit)
    monkeypatch.setattr(evaluation, "layer_predictions", counted_predictions)
    monkeypatch.setattr(runner, "lean_run", counted_lean)
    monkeypatch.setattr(lean_route, "ENABLED", True)
    monkeypatch.setattr(runner, "_launch_bound", lambda device: True)  # interventions' groups coalesced
    monkeypatch.setattr(sizing.Sizing, "tokens_per_forward", lambda self, device: self.accelerator_tokens)
    monkeypatch.setattr(sizing.Sizing, "prompts_per_batch", lambda self, device: self.accelerator_prompts)
    cpu_out, args = planted_run
    out = tmp_path / "accelerator"
    assert main([a if a != str(cpu_out) else str(out) for a in args]) == 0
    assert all(used.values()), used
    cpu, acc = (json.loads((d / "summary.json").read_text()) for d in (cpu_out, out))
    assert acc["patched_layer"] == cpu["patched_layer"]
    assert acc["probe"]["accuracy"] == pytest.approx(cpu["probe"]["accuracy"], abs=0.005)
    assert acc["top_heads"]["activation"][0]["head"] == cpu["top_heads"]["activation"][0]["head"]
    assert sorted(acc["circuit"]["heads"]) == sorted(cpu["circuit"]["heads"])
    assert acc["circuit"]["faithfulness"]["share"] == pytest.approx(cpu["circuit"]["faithfulness"]["share"], abs=0.02)
    a, c = acc["ablation"], cpu["ablation"]
    assert a["accuracy"] == pytest.approx(c["accuracy"], abs=0.01)
    assert a["refit_accuracy"] == pytest.approx(c["refit_accuracy"], abs=0.01)
    # the random sets' refits, fitted together here and one by one on the CPU
    assert a["random_refit_accuracies"] == pytest.approx(c["random_refit_accuracies"], abs=0.02)
