"""Work-normalised benchmark of ``wordpos run`` on the device it runs on (issue 14).

Times a plain forward pass over the probe's prompts, then runs the real pipeline
(:func:`wordpos.circuit.pipeline.run_pipeline`) into a temporary directory and reads each stage's compute
time from its ``summary.json``. Each stage's WORK is the token-layers a straightforward exact
implementation would compute (full prompts, from the patched layer to the probe's layer, a backward
pass counting twice), derived from what the stage actually measured (the shapes and finite entries of
its saved effects, its pair and prompt counts); the formula is written next to each number. EFFICIENCY
= (work / stage seconds) / (the plain forward's token-layers per second): tricks that skip work raise it
above 1. Fits and plots count as seconds only (no work). The whole run is also given in units of plain
forwards over the dataset (the number issue 14 pushes down).

    python scripts/bench.py --model organism --out docs/perf/organism-cpu.json
    python scripts/bench.py --model smollm2-arch --quick          # SmolLM2-135M's shapes, random weights
    python scripts/bench.py --model smollm2-arch --device cuda --dtype bfloat16 --out docs/perf/h100.json

``--model smollm2-arch`` needs no download: a randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's
exact config and tokenizer (shipped in ``scripts/bench_bundle/``) is saved as a Hugging Face directory
at run time and loaded with ``load_model(path)``; cost depends on the weights' shapes, not their values,
but its probe and circuit numbers mean nothing.
"""

from __future__ import annotations

import argparse
import atexit
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parent / "bench_bundle"
MODELS = ("organism", "smollm2-135m", "smollm2-arch", "planted")


# ------------------------------------------------------------------------------------------------- models
def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the script ends (a random-weight SmolLM2-135M in it is ~540 MB: twenty
    benchmark runs that kept theirs filled a disk)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def build_smollm2_arch(directory: Path, seed: int = 0, width: int | None = None) -> Path:
    """A randomly initialised LlamaForCausalLM with SmolLM2-135M's config and tokenizer, as an HF directory;
    ``width`` (a multiple of the 9 heads) makes it that narrow, layers and heads kept (``scripts/count_ops.py``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = BUNDLE / "smollm2-135m"
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, directory / name)
    with gzip.open(src / "tokenizer.json.gz", "rb") as f_in, open(directory / "tokenizer.json", "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    config = LlamaConfig.from_pretrained(directory)
    if width is not None:
        config.head_dim = width // config.num_attention_heads
        config.hidden_size = config.head_dim * config.num_attention_heads
        config.intermediate_size = 8 * width // 3
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return directory


def load_bench_model(name: str, device: str | None, dtype: str, workdir: Path) -> tuple[Any, str, bool]:
    """(model, the name results are saved under, whether the weights are random)."""
    from wordpos.probing import load_model

    if name == "smollm2-arch":
        path = build_smollm2_arch(workdir / "smollm2-arch")
        return load_model(str(path), device=device, dtype=dtype), str(path), True
    return load_model(name, device=device, dtype=dtype), name, False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
           f"{os.cpu_count()} cores visible)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn: Any, device: torch.device, repeats: int, warmup: bool) -> tuple[float, Any]:
    """The best wall time of ``repeats`` device-synchronised calls of ``fn`` (after one untimed call when
    ``warmup``), and the last call's result."""
    if warmup:
        fn()
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None  # let the previous result go before the next call
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


# ------------------------------------------------------------------------------------------ plain forward
@torch.inference_mode()
def plain_forward(engine: Any, data: Any, repeats: int = 2) -> dict[str, Any]:
    """Best-of-``repeats`` time of a plain forward (no hooks, all layers, no unembedding) over every split's
    prompts, batched as residual collection batches them. Returns seconds, tokens and token-layers."""
    from wordpos.probing.activations import residual_batch_size

    bs = residual_batch_size(engine, data, 0)
    n_layers = engine.dims.n_layers
    splits = [data.split(s) for s in ("train", "val", "test")]
    tokens = int(sum(int(ps.lengths.sum()) for ps in splits))
    n_prompts = sum(len(ps) for ps in splits)

    def once() -> None:
        for ps in splits:
            for b0 in range(0, len(ps), bs):
                width = int(ps.lengths[b0:b0 + bs].max())
                engine.run(ps.tokens[b0:b0 + bs, :width].to(engine.device), stop_at_layer=n_layers)

    # warm-up: kernels, allocator; on 2 CPU cores a first HF pass measured 13% slower than the next
    best, _ = _best_of(once, engine.device, repeats, warmup=True)
    return {"seconds": best, "tokens": tokens, "token_layers": tokens * n_layers, "batch_size": bs,
            "n_prompts": n_prompts, "mean_tokens_per_prompt": tokens / n_prompts}


def warm_collection(engine: Any, data: Any, repeats: int = 2) -> dict[str, Any]:
    """Best-of-``repeats`` time of ``collect_residuals`` over every layer and split (after a warm-up), the way the
    probe stage collects (its own batch size, word-final tokens gathered on the device, one copy to the host per
    chunk), without the stage's dataset generation, fits, plots and checkpoint."""
    from wordpos.probing.activations import collect_residuals

    # warm-up on accelerators: kernels and allocator (the plain forward warmed the CPU already)
    best, res = _best_of(lambda: collect_residuals(engine, data, layers="all", progress=False), engine.device,
                         repeats, warmup=engine.device.type != "cpu")
    return {"seconds": best, "batch_size": res.meta["batch_size"]}


# ------------------------------------------------------------------------------------------------- work
def _json(path: Path) -> dict[str, Any]:
    """A stage's JSON file, or {} when the stage did not write it."""
    return json.loads(path.read_text()) if path.exists() else {}


def _effects(directory: Path) -> Any | None:
    from wordpos.patching.results import EffectResult

    return EffectResult.load(directory) if (directory / "effects.json").exists() else None


def _depth_sum(res: Any, probe_layer: int, layer_axis: str = "layer") -> float:
    """Σ over the finite entries of ``res`` of (probe_layer + 1 - their layer): the layers a patch there
    recomputes (from the patched layer to the probe's)."""
    eff = np.asarray(res.effects, dtype=float)
    axis = list(res.axes).index(layer_axis)
    finite = np.isfinite(eff)
    per_layer = np.moveaxis(finite, axis, 0).reshape(eff.shape[axis], -1).sum(axis=1)
    return float(sum(int(c) * max(probe_layer + 1 - L, 0) for L, c in enumerate(per_layer)))


def fits_and_plots(run: Path, probe_timings: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Seconds each stage spent fitting probes and drawing and writing figures, as the stages recorded them, by part:
    the probe stage's fits and plots, each patching stage's figures (and the ablation stage's refits), the circuit
    stage's rendering and exports."""
    probes_s = float(probe_timings.get("probes_s") or 0)
    if "probes_fit_s" in probe_timings and probe_timings.get("solver") == "torch":  # the sweep's parts: the fits,
        # the layers' evaluation and checkpoints (scikit-learn's solver fits each layer inside that loop)
        fits = float(probe_timings["probes_fit_s"]) + float(probe_timings.get("probes_shuffled_s") or 0)
        probe = {"fits": fits, "evaluation and checkpoints": max(probes_s - fits, 0.0)}
    else:  # (scikit-learn's solver, or a run saved before the parts were timed)
        probe = {"fits": probes_s}
    parts = {"probe (all layers)": {**probe, "figures": float(probe_timings.get("plots_s") or 0)}}
    for method, stage in (("activation", "activation patching"), ("attribution", "attribution patching"),
                          ("path", "path patching"), ("ablation", "ablation")):
        s = _json(run / f"patch_{method}" / "summary.json")
        if "figures_s" in s.get("timings", {}):
            refit = ((s.get("top_k_ablation") or {}).get("config") or {}).get("timings", {}).get("refit_s", 0.0)
            parts[stage] = {"figures": float(s["timings"]["figures_s"]), "refits": float(refit)}
    render = (_json(run / "circuit" / "circuit.json").get("timings_s") or {}).get("render")
    if render is not None:
        parts["circuit"] = {"figures and exports": float(render)}
    return parts


def stage_work(run: Path, summary: dict[str, Any], n_layers: int, prompt_tokens: float) -> dict[str, dict[str, Any]]:
    """Token-layers a straightforward exact implementation computes for each stage of the run in ``run``,
    from what the stage measured. ``prompt_tokens``: mean tokens of a dataset prompt."""
    Lp = int(summary["patched_layer"])
    D = Lp + 1
    out: dict[str, dict[str, Any]] = {}

    def pairs_of(res: Any) -> tuple[int, int]:
        cfg = res.config or {}
        P = int(cfg.get("n_pairs") or res.n_prompts)
        T = int(res.effects.shape[list(res.axes).index("pos")]) if "pos" in res.axes else None
        return P, T

    act = run / "patch_activation"
    heads = _effects(act)
    P, _ = pairs_of(heads)
    resid = _effects(act / "resid")
    T = int(resid.effects.shape[1]) if resid is not None else int(round(prompt_tokens))
    PT = P * T
    roles_n = int(_json(act / "roles.json").get("n_prompts", 0))
    roles_w = roles_n * prompt_tokens * D
    base = 2 * PT * D

    parts = {"heads": _depth_sum(heads, Lp)}
    for sub in ("resid", "mlp", "heads_by_pos"):
        r = _effects(act / sub)
        if r is not None:
            parts[sub] = _depth_sum(r, Lp)
    w = base + PT * sum(parts.values()) + roles_w
    out["activation patching"] = {
        "work": w, "formula": "2·P·T·D (clean+corrupted base runs) + P·T·Σ_patches (Lp+1-l) over heads, resid "
        "layer×pos, MLPs and heads×pos measured + roles prompts·T̄·D",
        "terms": {"P": P, "T": T, "D": D, "patch_depth_sums": parts, "roles_prompts": roles_n}}

    att_dir = run / "patch_attribution"
    act_heads = _effects(att_dir / "activation_heads")
    w = 4 * PT * D + base + (PT * _depth_sum(act_heads, Lp) if act_heads is not None else 0) + roles_w
    out["attribution patching"] = {
        "work": w, "formula": "4·P·T·D (clean fwd + corrupted fwd + backward ×2) + 2·P·T·D base + activation "
        "patching of heads P·T·Σ(Lp+1-l) (its comparison) + roles", "terms": {"P": P, "T": T, "D": D}}

    path_dir = run / "patch_path"
    direct = _effects(path_dir)
    edges = _effects(path_dir / "edges")
    act_heads = _effects(path_dir / "activation_heads")
    w = base + PT * _depth_sum(direct, Lp) + roles_w
    w += PT * _depth_sum(act_heads, Lp) if act_heads is not None else 0
    w += PT * _depth_sum(edges, Lp, "sender_layer") if edges is not None else 0
    out["path patching"] = {
        "work": w, "formula": "2·P·T·D base + P·T·Σ_senders (Lp+1-l) (direct paths) + P·T·Σ_edges (Lp+1-l_sender) "
        "+ activation patching of heads + roles",
        "terms": {"P": P, "T": T, "D": D, "n_edges": int(np.isfinite(edges.effects).sum()) if edges is not None else 0}}

    ab = run / "patch_ablation"
    abl = _effects(ab)
    ab_sum = json.loads((ab / "summary.json").read_text())
    topk = ab_sum.get("top_k_ablation") or {}
    n_test = int(abl.n_prompts)
    n_ab_prompts = int(json.loads((ab / "config.json").read_text()).get("config", {}).get("n_prompts", 768)) \
        if (ab / "config.json").exists() else 768
    n_train = max(int(round(n_ab_prompts * 0.6)), 1)  # the dataset's split shares (60/20/20)
    n_sets = 1 + len(topk.get("random_heads") or [])  # top-k + random sets, each also refitted
    Tt = prompt_tokens
    cands = (abl.config or {}).get("candidates")
    w = ((4 * PT * D if cands else 0)  # attribution ranks the candidate heads on big models
         + roles_w
         + n_train * Tt * D  # head means (mean ablation reference)
         + n_test * Tt * D  # clean predictions
         + n_test * Tt * _depth_sum(abl, Lp)  # each head ablated alone
         + n_sets * (n_train + n_test) * Tt * D)  # top-k and random sets: test predictions + refit features
    out["ablation"] = {
        "work": w, "formula": "N_train·T̄·D (means) + N_test·T̄·D (clean) + N_test·T̄·Σ_heads (Lp+1-l) + "
        "(1+n_random)·(N_train+N_test)·T̄·D (sets, with refits) [+ 4·P·T·D attribution of candidates on big "
        "models] + roles; probe refits: seconds only",
        "terms": {"N_test": n_test, "N_train": n_train, "T_mean": Tt, "D": D, "n_sets": n_sets}}

    circ = _json(run / "circuit" / "circuit.json")
    if "cpr" in circ:  # the edge circuit: scores, curve vs random, the search for the smallest circuit
        Pc = int(circ.get("n_pairs") or P)
        steps = int(circ.get("steps") or 1)
        method = circ.get("scores", "eap-ig")
        n_valid = int(circ.get("n_valid_edges") or 0)
        score_passes = {"eap": 2 + 3, "eap-ig": 2 + 3 * steps, "exact": 2 + n_valid}.get(method, 2 + 3 * steps)
        curve = circ.get("curve") or {}
        n_curve = len(curve.get("points") or []) * (1 + int(curve.get("n_random") or 0)) + 2  # + full and empty
        node = circ.get("node_curve") or {}
        n_node = len(node.get("points") or []) * (1 + int(node.get("n_random") or 0)) if node else 0
        n_select = int((circ.get("circuit") or {}).get("evaluated_sizes") or 0)
        passes = score_passes + n_curve + n_node + n_select
        w = passes * Pc * T * D
        out["circuit"] = {"work": w, "formula": "(2 base runs + scores: 3 per EAP-IG step (fwd + bwd), 3 for EAP, "
                          "one forward per edge for exact + one patched forward per evaluated circuit: curve sizes "
                          "x (1 + n_random) + full + empty, node-level curve, the search's sizes) x P·T·D; "
                          "rendering and exports: seconds only",
                          "terms": {"P": Pc, "T": T, "D": D, "scores": method, "steps": steps,
                                    "score_passes": score_passes, "curve_circuits": n_curve,
                                    "node_curve_circuits": n_node, "search_circuits": n_select},
                          "phases_s": circ.get("timings_s")}
    else:  # the former head-level circuit
        n_c = int((circ.get("faithfulness") or {}).get("n_samples") or 0)
        n_circuit_prompts = min(int(summary.get("n_prompts") or 1024), 1024)
        n_c_train = int(round(n_circuit_prompts * 0.6))
        n_c_test = int(round(n_circuit_prompts * 0.2))
        w = n_c_train * Tt * D + 2 * n_c_test * Tt * D
        out["circuit"] = {"work": w, "formula": "N_train·T̄·D (mean-ablation reference) + 2·N_test·T̄·D (full and "
                          "circuit-only runs); graph building, pruning, rendering: seconds only",
                          "terms": {"N_train": n_c_train, "N_test": n_c_test, "T_mean": Tt, "D": D, "n_samples": n_c}}

    ev = _json(run / "attention" / "evidence.json")
    n_e = int(ev.get("n_prompts") or 0)
    out["attention evidence"] = {"work": (n_e + 1) * Tt * D, "formula": "(N_evidence + 1 example)·T̄·D",
                                 "terms": {"N_evidence": n_e, "T_mean": Tt, "D": D}}
    return out


# --------------------------------------------------------------------------------------------------- main
_SHORT_STAGES = {"probe": "probe (all layers)", "activation": "activation patching",
                 "attribution": "attribution patching", "path": "path patching", "attention": "attention evidence",
                 "imports": "circuit imports", "check": "edge check", "ablation": "ablation", "circuit": "circuit",
                 "report": "report"}


def _stage_names(names: Any) -> set[str]:
    """The pipeline's names of the stages ``names`` (short or full); one clear error for a name it has not."""
    full = {_SHORT_STAGES.get(n, n) for n in names}
    unknown = full - set(_SHORT_STAGES.values())
    if unknown:
        raise SystemExit(f"--profile-stages: no stage named {', '.join(sorted(unknown))}; the stages are "
                         f"{', '.join(sorted(_SHORT_STAGES))} (or their full names, e.g. 'path patching')")
    return full


def profile_text(prof: Any, top: int) -> dict[str, str]:
    """A ``cProfile.Profile``'s (or a saved profile file's) ``top`` lines by own time and by cumulative time
    (``{"tottime", "cumulative"}``)."""
    import io
    import pstats

    out = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        out[key] = buf.getvalue()
    return out


def _wrap_stages(wrap: Any) -> Any:
    """Send each stage's timing context (``pipeline._stage``) through ``wrap(name, inner)``, a context manager that
    enters ``inner``, so that a stage is watched where the pipeline runs it, in its own process and state (warm or
    cold as a researcher's run is). Returns the function that undoes it."""
    from wordpos.circuit import pipeline

    original = pipeline._stage
    pipeline._stage = lambda name, *a, **kw: wrap(name, original(name, *a, **kw))
    return lambda: setattr(pipeline, "_stage", original)


def _profile_stages(names: Any, directory: Path) -> Any:
    """cProfile the pipeline's stages named ``names`` (as the run names them, e.g. "circuit", "ablation") where
    they run (:func:`_wrap_stages`); writes ``prof-<stage>.txt`` into ``directory``. Returns the function that
    unwraps it."""
    if not names:
        return lambda: None
    import cProfile
    import contextlib

    wanted = _stage_names(names)

    @contextlib.contextmanager
    def profiled(name: str, inner: Any) -> Any:
        prof = cProfile.Profile()
        try:
            with inner:  # the stage's time stops with this block: the profile's writing is not in it
                prof.enable()
                try:
                    yield
                finally:
                    prof.disable()
        finally:
            directory.mkdir(parents=True, exist_ok=True)
            text = profile_text(prof, 80).values()
            slug = {v: k for k, v in _SHORT_STAGES.items()}.get(name, name)  # ("circuit imports" -> "imports")
            (directory / f"prof-{slug}.txt").write_text("\n".join(text))

    return _wrap_stages(lambda name, inner: profiled(name, inner) if name in wanted else inner)


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")'s message


class SyncAudit:
    """Every time the host waits for the device during the run, by stage and by the wordpos line that made it
    wait. A wait costs the overlap of the host's work for the next forward with the device's work on this one, so
    on a GPU a stage with a wait per forward takes their sum instead of the longer of the two. On CUDA,
    ``torch.cuda.set_sync_debug_mode("warn")`` makes each synchronising call warn (item, nonzero, a copy to the host,
    a blocking copy from pageable memory, ...); each warning is tallied under the stage running (``pipeline._stage``,
    wrapped) and the innermost frame of a ``wordpos`` module on the stack. Its stage seconds include the
    warnings' cost: read the counts, not the times."""

    def __init__(self) -> None:
        from collections import Counter, defaultdict

        self.stage = "outside stages"
        self.sites: dict[str, Counter] = defaultdict(Counter)

    def note(self) -> None:
        """Tally one wait at the innermost ``wordpos`` frame of the caller's stack (``module:function:line``, and
        the line of the call it made into a library)."""
        frame, below = sys._getframe(1), None
        while frame is not None and not str(frame.f_globals.get("__name__", "")).startswith("wordpos."):
            frame, below = frame.f_back, frame
        if frame is None:
            site = "(no wordpos frame)"
        else:
            code = frame.f_code
            site = f"{frame.f_globals['__name__']}:{getattr(code, 'co_qualname', code.co_name)}:{frame.f_lineno}"
            if below is not None:
                site += f" -> {Path(below.f_code.co_filename).name}:{below.f_code.co_name}"
        self.sites[self.stage][site] += 1

    def summary(self, top: int = 12) -> dict[str, Any]:
        return {stage: {"syncs": sum(c.values()), "sites": dict(c.most_common(top))} for stage, c in self.sites.items()}

    def attach(self, device: torch.device) -> Any:
        """Watch the pipeline's stages (and, on CUDA, turn the sync warnings on); returns the function that undoes
        it."""
        import contextlib
        import warnings

        audit = self

        @contextlib.contextmanager
        def watched(name: str, inner: Any) -> Any:
            audit.stage = name
            try:
                with inner:
                    yield
            finally:
                audit.stage = "outside stages"

        caught = warnings.catch_warnings()
        caught.__enter__()
        warnings.filterwarnings("always", message=SYNC_WARNING)  # every one, not once per line
        shown = warnings.showwarning

        def showwarning(message: Any, category: Any, *a: Any, **kw: Any) -> None:
            if SYNC_WARNING in str(message):
                audit.note()
            else:
                shown(message, category, *a, **kw)

        warnings.showwarning = showwarning
        unwrap = _wrap_stages(watched)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")

        def undo() -> None:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            unwrap()
            caught.__exit__(None, None, None)

        return undo


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism", choices=MODELS)
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--n-prompts", type=int, default=None, help="probe prompts (default: the pipeline's sizing)")
    ap.add_argument("--n-pairs", type=int, default=None, help="patching pairs (default: the pipeline's sizing)")
    ap.add_argument("--n-random", type=int, default=None, help="random-head control sets (default 10)")
    ap.add_argument("--layer", type=int, default=None, help="patch at this layer's probe instead of the best "
                                                             "layer's (a shallower, cheaper run)")
    ap.add_argument("--quick", action="store_true", help="small sizes (256 prompts, 8 pairs, 2 random sets): "
                                                          "a smoke run, minutes on a CPU")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    ap.add_argument("--markdown", action="store_true", help="also print the docs/performance.md table rows")
    ap.add_argument("--keep", type=Path, default=None, help="run the pipeline into this directory and keep it")
    ap.add_argument("--profile-stages", nargs="+", default=(), metavar="STAGE",
                    help="cProfile these stages of the run (e.g. circuit ablation; their seconds then include the "
                         "profiler's overhead): prof-<stage>.txt, sorted by own and by cumulative time, beside --out")
    ap.add_argument("--sync-audit", action="store_true",
                    help="count the host's waits for the device per stage and where in wordpos they happen (CUDA: "
                         "torch's sync debug mode; its stage seconds then include the warnings' cost)")
    args = ap.parse_args(argv)
    _stage_names(args.profile_stages)  # before minutes of work
    from wordpos.probing import heap

    heap.pause_until_loaded()  # as the `wordpos` command does (probing.heap): stage times are the CLI's
    try:
        return _bench(args)
    finally:
        heap.resume()


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from wordpos.circuit.pipeline import RunConfig, run_pipeline
    from wordpos.probing import WordIndexDataset
    from wordpos.probing.engines import as_engine

    n_prompts = args.n_prompts or (256 if args.quick else None)
    n_pairs = args.n_pairs or (8 if args.quick else None)
    n_random = args.n_random if args.n_random is not None else (2 if args.quick else 10)
    work = Path(tempfile.mkdtemp(prefix="wordpos-bench-"))
    try:
        t0 = time.perf_counter()
        model, name, random_weights = load_bench_model(args.model, args.device, args.dtype, work)
        load_s = time.perf_counter() - t0
        engine = as_engine(model)
        dims = engine.dims
        config = RunConfig(model=name, n_prompts=n_prompts, n_pairs=n_pairs, n_random=n_random,
                           layer=args.layer, device=str(engine.device)).sized(dims.n_layers, dims.n_heads)
        data = WordIndexDataset.default(engine.tokenizer, n_prompts=config.n_prompts, seed=config.seed)
        plain = plain_forward(engine, data, repeats=2 if engine.device.type != "cpu" else 1)
        rate = plain["token_layers"] / plain["seconds"]
        collect = warm_collection(engine, data, repeats=2 if engine.device.type != "cpu" else 1)
        collect["efficiency"] = plain["seconds"] / collect["seconds"]  # same token-layers as the plain forward
        run_dir = args.keep or work / "run"
        restore = _profile_stages(args.profile_stages, (args.out.parent if args.out else Path.cwd()))
        audit = SyncAudit() if args.sync_audit else None
        unwatch = audit.attach(engine.device) if audit is not None else (lambda: None)
        t0 = time.perf_counter()
        try:
            result = run_pipeline(config, run_dir, model=model, overwrite=True, progress=False)
        finally:
            unwatch()
            restore()
        run_s = time.perf_counter() - t0
        summary = result.summary
        summary["n_prompts"] = config.n_prompts
        compute = dict(summary["compute_s"])
        compute["load model"] = round(load_s, 2)  # the model was loaded here, outside the pipeline
        works = stage_work(Path(run_dir), summary, dims.n_layers, plain["mean_tokens_per_prompt"])
        probe_metrics = json.loads((Path(run_dir) / "probe" / "metrics.json").read_text())
        t_probe = probe_metrics.get("timings", {})
        probe_work = plain["token_layers"]  # residual collection: every prompt through every layer
        works = {"probe (all layers)": {
            "work": probe_work, "formula": "N·T̄·n_layers (residual collection of every prompt at every layer); "
            "the probe fits: seconds only",
            "terms": {"N": plain["n_prompts"], "T_mean": plain["mean_tokens_per_prompt"], "n_layers": dims.n_layers,
                      "collect_s": t_probe.get("residuals_s"), "checkpoint_s": t_probe.get("residuals_checkpoint_s"), "fits_s": t_probe.get("probes_s"),
                      "plots_s": t_probe.get("plots_s")}}, **works}
        side_parts = fits_and_plots(Path(run_dir), t_probe)
        side = {stage: sum(p.values()) for stage, p in side_parts.items()}
        stages = []
        for stage, secs in compute.items():
            row: dict[str, Any] = {"stage": stage, "seconds": float(secs)}
            if stage in works:
                wk = works[stage]
                row.update(work_token_layers=float(wk["work"]), formula=wk["formula"], terms=wk["terms"],
                           efficiency=float(wk["work"]) / max(float(secs), 1e-9) / rate)
                if "phases_s" in wk:
                    row["phases_s"] = wk["phases_s"]
                if stage in side:
                    row["fits_plots_s"] = side[stage]
                    if len(side_parts[stage]) > 1:  # (the circuit's one part is fits_plots_s itself)
                        row["fits_plots_parts_s"] = side_parts[stage]
                    row["efficiency_without_fits_plots"] = \
                        float(wk["work"]) / max(float(secs) - side[stage], 1e-9) / rate
                if stage == "probe (all layers)" and t_probe.get("residuals_s"):
                    row["collect_efficiency"] = float(wk["work"]) / t_probe["residuals_s"] / rate
            stages.append(row)
        total = sum(float(s) for k, s in compute.items() if k != "load model")
        record = {
            "device": device_name(engine.device), "device_type": engine.device.type, "dtype": args.dtype,
            "model": args.model, "random_weights": random_weights,
            "note": ("weights are RANDOM (SmolLM2-135M's config and tokenizer): timings only, its probe and circuit "
                     "numbers mean nothing") if random_weights else "",
            "dims": {"n_layers": dims.n_layers, "n_heads": dims.n_heads, "d_model": dims.d_model},
            "config": {"n_prompts": config.n_prompts, "n_pairs": config.n_pairs, "n_random": config.n_random,
                       "quick": args.quick, "probe_layer": summary["patched_layer"]},
            "plain_forward": {**plain, "token_layers_per_s": rate},
            "residual_collection_warm": collect,
            "load_model_s": load_s,
            "stages": stages,
            "run_compute_s": total,
            "run_wall_s": run_s,
            "run_in_plain_forwards": total / plain["seconds"],
            "run_in_plain_forwards_with_load": (total + load_s) / plain["seconds"],
            "definitions": {
                "work": "token-layers a straightforward exact implementation computes (full prompts, patched layer "
                        "to the probe's layer, backward = 2 forwards)",
                "efficiency": "(work / stage seconds) / plain forward token-layers per second",
                "efficiency_without_fits_plots": "the same with the stage's probe fits and figure drawing/writing "
                                                 "(fits_plots_s, measured inside the stage) taken out of its seconds",
                "run_in_plain_forwards": "sum of stage compute seconds (model load excluded) / seconds of one plain "
                                         "forward over the probe's prompts"},
            "torch": torch.__version__, "python": sys.version.split()[0],
        }
        if args.profile_stages:
            record["profiled_stages"] = list(args.profile_stages)  # their seconds include cProfile's overhead
        if audit is not None:  # (its seconds include the warnings' cost)
            record["syncs"] = {"note": "host waits for the device per stage, by the wordpos line that waited "
                                       "(torch.cuda.set_sync_debug_mode('warn')); none are seen on a CPU",
                               "by_stage": audit.summary()}
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(record)
    if args.markdown:
        print(markdown_rows(record))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from wordpos.probing.io import write_json

        write_json(args.out, record)
        print(f"wrote {args.out}")
    return record


def print_table(rec: dict[str, Any]) -> None:
    pf = rec["plain_forward"]
    print(f"device: {rec['device']}   dtype: {rec['dtype']}   model: {rec['model']}"
          + ("   (RANDOM weights: timings only)" if rec["random_weights"] else ""))
    print(f"plain forward: {pf['n_prompts']} prompts, {pf['tokens']} tokens x {rec['dims']['n_layers']} layers in "
          f"{pf['seconds']:.2f} s = {pf['token_layers_per_s']:,.0f} token-layers/s (batch {pf['batch_size']})")
    rc = rec.get("residual_collection_warm")
    if rc:
        print(f"residual collection (all layers, warm, batch {rc['batch_size']}): {rc['seconds']:.2f} s = "
              f"{rc['efficiency']:.2f} of the plain-forward token rate")
    print(f"{'stage':<24}{'seconds':>10}{'work (token-layers)':>22}{'efficiency':>12}{'fits+plots s':>14}"
          f"{'eff. without':>14}")
    for s in rec["stages"]:
        w = f"{s['work_token_layers']:,.0f}" if "work_token_layers" in s else "-"
        e = f"{s['efficiency']:.2f}" if "efficiency" in s else "-"
        fp = f"{s['fits_plots_s']:.2f}" if "fits_plots_s" in s else "-"
        e2 = f"{s['efficiency_without_fits_plots']:.2f}" if "efficiency_without_fits_plots" in s else "-"
        print(f"{s['stage']:<24}{s['seconds']:>10.2f}{w:>22}{e:>12}{fp:>14}{e2:>14}")
    for s in rec["stages"]:  # what the side seconds were spent on, where they went to more than one thing
        parts = {k: v for k, v in (s.get("fits_plots_parts_s") or {}).items() if v >= 0.005}
        if len(parts) > 1:
            print(f"parts of {s['stage']}'s fits+plots: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    print(f"whole run: {rec['run_compute_s']:.1f} s = {rec['run_in_plain_forwards']:.1f} plain forwards over the "
          f"dataset ({rec['run_in_plain_forwards_with_load']:.1f} with the model load of {rec['load_model_s']:.1f} s)")
    for stage, got in (rec.get("syncs") or {}).get("by_stage", {}).items():
        print(f"syncs in {stage}: {got['syncs']}")
        for site, n in list(got["sites"].items())[:6]:
            print(f"  {n:>6}  {site}")


def markdown_rows(rec: dict[str, Any]) -> str:
    """Rows of the docs/performance.md table: device, dtype, model, stage, seconds, work, efficiency, and the
    whole run in plain forwards."""
    head = f"{rec['device']} | {rec['dtype']} | {rec['model']}{' (random weights)' if rec['random_weights'] else ''}"
    pf = rec["plain_forward"]
    lines = [f"| {head} | plain forward ({pf['n_prompts']} prompts) | {pf['seconds']:.2f} | "
             f"{pf['token_layers']:,} | 1.00 | 1.0 |"]
    rc = rec.get("residual_collection_warm")
    if rc:
        lines.append(f"| {head} | residual collection, all layers (warm, outside the run) | {rc['seconds']:.2f} | "
                     f"{pf['token_layers']:,} | {rc['efficiency']:.2f} | {rc['seconds'] / pf['seconds']:.1f} |")
    for s in rec["stages"]:
        w = f"{s['work_token_layers']:,.0f}" if "work_token_layers" in s else "–"
        e = f"{s['efficiency']:.2f}" if "efficiency" in s else "–"
        if "efficiency_without_fits_plots" in s:
            e += f" ({s['efficiency_without_fits_plots']:.2f} without its {s['fits_plots_s']:.2f} s of fits and plots)"
        lines.append(f"| {head} | {s['stage']} | {s['seconds']:.2f} | {w} | {e} | "
                     f"{s['seconds'] / pf['seconds']:.1f} |")
    lines.append(f"| {head} | **whole run** (load excluded) | {rec['run_compute_s']:.1f} | | | "
                 f"**{rec['run_in_plain_forwards']:.1f}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
