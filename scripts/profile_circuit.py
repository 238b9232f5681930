"""Where the edge-circuit stage's time goes on a device (issue 14): the stage of ``wordpos run``
(``circuit.edge_circuit.edge_circuit_stage``: EAP-IG scores, the prefetched curve circuits, the search, the curves,
figures and exports) run three times on one probe: once cold (its phases; ``--cold-profile`` adds a cProfile of it), once timed (its phases as the stage records
them), once under ``torch.profiler`` (kernel launches, host syncs, device busy time, the top operators). It also
times one batched evaluation of random circuits with the q/k/v correction fused per layer and per site
(``EdgeRunner.fuse_qkv``), beside a plain forward of the same pairs. Prints a summary and writes JSON.

    python scripts/profile_circuit.py --model smollm2-arch --device cuda --layer 23 --dtype bfloat16 --out p.json

``smollm2-arch`` is SmolLM2-135M's architecture with random weights (``scripts/bench_bundle``): timings only.
``--host-only`` times the host's share of the stage alone (:func:`host_only`), on any device, the CPU included."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _sync, build_smollm2_arch, device_name, profile_text, scratch_dir  # noqa: E402


def _timed(fn, device: str) -> tuple[float, object]:
    _sync(torch.device(device))
    t0 = time.perf_counter()
    out = fn()
    _sync(torch.device(device))
    return time.perf_counter() - t0, out


def _profile(fn, device: str, top: int = 20) -> dict:
    """Counts from one profiled call: launches, host syncs, device busy seconds, top operators."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        wall, _ = _timed(fn, device)
    ka = prof.key_averages()
    count = lambda *names: sum(e.count for e in ka if e.key in names)  # noqa: E731
    dev_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in ka)
    rows = lambda key: [{"op": e.key, "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),  # noqa: E731
                         "self_device_ms": round((getattr(e, "self_device_time_total", 0) or 0) / 1e3, 2)}
                        for e in sorted(ka, key=key, reverse=True)[:top]]
    return {"wall_s_profiled": round(wall, 3),
            "kernel_launches": count("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"),
            "host_syncs": count("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
            "memcpy_calls": count("cudaMemcpyAsync", "cudaMemcpy"),
            "aten_ops": sum(e.count for e in ka if e.key.startswith("aten::")),
            "device_busy_s": round(dev_us / 1e6, 3),
            "top_self_cpu": rows(lambda e: e.self_cpu_time_total),
            "top_self_device": rows(lambda e: getattr(e, "self_device_time_total", 0) or 0)}


def host_only(engine, ctx, work: Path, repeats: int = 5) -> dict:
    """The stage with every patched forward, gradient pass and edge score replaced by an instant stand-in (per-pair
    values from a planted per-edge importance, noisy scores of it): what is left is the host's share, the same on any
    device (masks, pruning, the memo, bootstraps, figures and exports). Best of ``repeats``, per phase."""
    from unittest import mock

    from wordpos.circuit.edge_circuit import edge_circuit_stage
    from wordpos.patching.edge_graph import EdgeScores
    from wordpos.patching.edge_runner import EdgeRunner

    runner = EdgeRunner(engine, ctx)
    g = runner.graph
    gen = torch.Generator().manual_seed(0)
    truth = 0.01 * torch.rand(g.n_writers, g.n_readers, generator=gen) * g.valid
    # a planted circuit of 13 edges (paths input -> head/MLP -> probe), so the selected circuit is as small as
    # a real one and the figures and exports cost what they cost there
    planted = ["input->probe"] + [e for L in (0, g.probe_layer // 2, g.probe_layer)
                                  for e in (f"input->a{L}.h0<v>", f"a{L}.h0->probe", f"input->m{L}", f"m{L}->probe")]
    for e in planted:
        truth[g.edge(e)] = 10.0

    def values(self, keep_not, n_circuits=None, **_):
        kn = keep_not(0, n_circuits) if callable(keep_not) else keep_not
        lost = (kn.double().cpu() * truth).sum((1, 2)) / truth.sum()
        noise = torch.randn(kn.shape[0], len(self.pairs), generator=gen, dtype=torch.float64)
        return (1 - lost)[:, None] + 0.01 * noise

    def scores(model, ctx, method="eap-ig", steps=5, **_):
        return EdgeScores(g, (-truth + 0.05 * torch.randn(truth.shape, generator=gen)).double() * g.valid, method,
                          "probe", len(runner.pairs), {})

    best: dict[str, float] = {}
    ones = lambda self: torch.ones(len(self.pairs), dtype=torch.float64)  # noqa: E731
    with mock.patch.object(EdgeRunner, "__init__", lambda self, *a, **k: self.__dict__.update(runner.__dict__)), \
            mock.patch.object(EdgeRunner, "evaluate_keep_not", values), \
            mock.patch.object(EdgeRunner, "clean_values", ones), \
            mock.patch("wordpos.patching.eap.score_edges", scores):
        for i in range(repeats + 1):  # the first: warm-up
            t0 = time.perf_counter()
            s = edge_circuit_stage(engine, ctx, work / f"host-only-{i}", progress=False, png=False)
            phases = {**s["timings_s"], "stage": time.perf_counter() - t0,
                      "compute": sum(s["timings_s"][k] for k in ("prefetch", "select", "curve"))}
            if i:
                best = {k: min(v, best.get(k, float("inf"))) for k, v in phases.items()}
    return {k: round(v, 4) for k, v in best.items()} | {"edges_selected": s["edges"]}


def sdpa_choice(engine, layer: int, dtype: str) -> dict:
    """The attention kernel PyTorch picks for the lean forward's shapes (14 query positions after a 19-token
    prefix, the model's heads, a boolean mask), with every backend allowed and with ``LeanBlocks.sdpa_backends``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from wordpos.probing.engines.lean import LeanBlocks

    d = engine.dims
    dh = d.d_model // d.n_heads
    kw = {"device": engine.device, "dtype": getattr(torch, dtype)}
    q, k = torch.randn(64, d.n_heads, 14, dh, **kw), torch.randn(64, d.n_kv_heads, 33, dh, **kw)
    mask = torch.ones(14, 33, dtype=torch.bool, device=engine.device).tril(19)
    names = {int(v.value): k for k, v in SDPBackend.__members__.items()}
    pick = lambda: names.get(int(torch._fused_sdp_choice(q, k, k, attn_mask=mask,  # noqa: E731
                                                          enable_gqa=d.n_kv_heads != d.n_heads)), "?")
    out = {"default": pick()}
    kernels = LeanBlocks.attention_kernels()
    if kernels:
        with sdpa_kernel(kernels):
            out["lean"] = pick()
    return out


def probe_context(model: object, layer: int, n_pairs: int) -> tuple[object, object]:
    """(engine, the patching context of ``n_pairs`` held-out-word pairs) for a probe fitted at ``layer`` on 256
    prompts: what the circuit stage runs on (``prepare(full_base_cache=True)``, as ``wordpos run``)."""
    from wordpos.patching import make_pairs, prepare
    from wordpos.probing import WordIndexDataset, WordIndexProbe, as_engine, collect_residuals

    engine = as_engine(model)
    data = WordIndexDataset.default(engine.tokenizer, n_prompts=256, seed=0)
    acts = collect_residuals(model, data, layers=[layer], progress=False)
    probe = WordIndexProbe(layer=layer, model=engine.name).fit(acts.train(layer), acts.labels["train"])
    pairs = make_pairs(engine.tokenizer, n_pairs, vocab=data.vocab, words="test", seed=0)
    return engine, prepare(engine, pairs, probe, full_base_cache=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-arch", help="smollm2-arch (random weights), organism, or a path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layer", type=int, default=8, help="the probe's layer (the circuit's graph ends there)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--n-circuits", type=int, default=40, help="random circuits in the fused/unfused evaluation")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--sdpa-default", action="store_true",
                    help="let PyTorch choose the lean forward's attention kernel (LeanBlocks.sdpa_backends = None)")
    ap.add_argument("--cold-profile", action="store_true",
                    help="cProfile the first (cold) call (its seconds then include the profiler's overhead)")
    ap.add_argument("--host-only", action="store_true",
                    help="only the host's share of the stage: every forward replaced by an instant stand-in "
                    "(host_only)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from wordpos.circuit.edge_circuit import edge_circuit_stage
    from wordpos.patching.edge_runner import EdgeRunner
    from wordpos.probing import load_model
    from wordpos.probing.engines.lean import LeanBlocks

    if args.sdpa_default:
        LeanBlocks.sdpa_backends = None
    work = scratch_dir("wordpos-profile-")
    path = str(build_smollm2_arch(work / "smollm2-arch")) if args.model == "smollm2-arch" else args.model
    model = load_model(path, device=args.device, dtype=args.dtype)
    L = args.layer
    engine, ctx = probe_context(model, L, args.pairs)
    pairs = ctx.pairs
    if args.host_only:
        rec = {"model": args.model, "probe_layer": L, "n_pairs": args.pairs, "host": device_name(torch.device("cpu")),
               "host_only": host_only(engine, ctx, work)}
        print(json.dumps(rec))
        if args.out:
            args.out.write_text(json.dumps(rec, indent=1))
        return
    stage = lambda d: edge_circuit_stage(engine, ctx, work / d, progress=False, png=False)  # noqa: E731
    rec: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                 "model": args.model, "random_weights": args.model == "smollm2-arch", "dtype": args.dtype,
                 "probe_layer": L, "n_pairs": args.pairs, "torch": torch.__version__,
                 "sdpa_backends": LeanBlocks.sdpa_backends, "sdpa_choice": sdpa_choice(engine, L, args.dtype)}
    if args.cold_profile:  # the first call's Python profile: where first-use costs (kernels, imports) land
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    warm, first = _timed(lambda: stage("warm"), args.device)
    if args.cold_profile:
        prof.disable()
        rec.update({f"cold_profile_{key}": text for key, text in profile_text(prof, 40).items()})
    wall, summary = _timed(lambda: stage("timed"), args.device)
    # under --cold-profile the cold call's seconds include cProfile's overhead (compare cold calls only with each other)
    rec.update(warmup_s=round(warm, 3), warmup_profiled=bool(args.cold_profile),
               warmup_phases_s=first["timings_s"],  # type: ignore[index]
               stage_s=round(wall, 3), phases_s=summary["timings_s"],  # type: ignore[index]
               edges=summary["edges"], n_valid_edges=summary["n_valid_edges"])  # type: ignore[index]

    runner = EdgeRunner(engine, ctx)
    g = runner.graph
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([(torch.rand(g.n_writers, g.n_readers, generator=gen) < p) & g.valid
                         for p in torch.linspace(0.01, 0.99, args.n_circuits).tolist()])
    runner.evaluate(masks[:2])  # warm: full model, empty circuit
    evals, vals = {}, {}
    for fuse in (False, True, False, True):
        EdgeRunner.fuse_qkv = fuse
        dt, res = _timed(lambda: runner.evaluate(masks).values, args.device)
        key = "fused" if fuse else "per_site"
        evals[key] = round(min(dt, evals.get(key, float("inf"))), 4)
        vals[key] = res
    EdgeRunner.fuse_qkv = True
    clean = pairs.clean.to(engine.device)
    with torch.inference_mode():  # as bench.py's plain forward
        dt, _ = _timed(lambda: engine.run(clean, stop_at_layer=L + 1), args.device)
        dt, _ = _timed(lambda: engine.run(clean, stop_at_layer=L + 1), args.device)
    rec["evaluation"] = {"n_circuits": args.n_circuits, **evals,
                         "fused_vs_per_site_max_abs_diff": float((vals["fused"] - vals["per_site"]).abs().max()),
                         "plain_forward_of_the_pairs_s": round(dt, 4)}
    if not args.no_profile:
        rec["profile"] = _profile(lambda: stage("profiled"), args.device)
    print(json.dumps({k: v for k, v in rec.items() if k != "profile" and not k.startswith("cold_")}))
    if "profile" in rec:
        p = rec["profile"]
        print({k: p[k] for k in ("wall_s_profiled", "kernel_launches", "host_syncs", "memcpy_calls", "aten_ops",
                                 "device_busy_s")})
        for r in p["top_self_cpu"][:12]:
            print("  cpu ", r)
        for r in p["top_self_device"][:8]:
            print("  dev ", r)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
