"""``wordpos circuit`` and ``wordpos run``."""

from __future__ import annotations

import argparse
from pathlib import Path

from wordpos.probing.cli import add_common_model_args


def add_circuit_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("circuit", help="the edge circuit: EAP-IG edge scores, faithfulness curve vs random, the "
                                       "smallest circuit reaching --target, diagram and exports",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(p)
    p.add_argument("--probe", required=True, type=Path, help="probe directory (or a `wordpos probe` run directory)")
    p.add_argument("--out", required=True, type=Path, help="output directory (files go to OUT/circuit/)")
    p.add_argument("--n-pairs", type=int, default=32, help="clean/corrupted prompt pairs")
    p.add_argument("--scores", default="eap-ig", choices=["eap", "eap-ig", "exact"],
                   help="edge scores: attribution patching, EAP with integrated gradients, or exact edge patching")
    p.add_argument("--ablation", default="counterfactual", choices=["counterfactual", "mean", "resample"],
                   help="value carried by the edges outside the circuit")
    p.add_argument("--target", type=float, default=0.8, help="faithfulness the reported circuit must reach")
    p.add_argument("--rule", default="top-n", choices=["top-n", "greedy"],
                   help="edge order the circuit grows in: by |score|, or greedily from the probe")
    p.add_argument("--steps", type=int, default=5, help="integrated-gradient points (--scores eap-ig)")
    p.add_argument("--n-random", type=int, default=3, help="random edge sets per curve size")
    p.add_argument("--node-baseline", default="edge-sum", choices=["edge-sum", "effect", "none"],
                   help="node-level curve for comparison: heads/MLPs ranked by summed |edge score| or by their "
                        "single-node ablation effect")
    legacy = p.add_argument_group("head-level circuit (the former path-patching circuit)")
    legacy.add_argument("--head-level", action="store_true",
                        help="path-patch heads and prune a head graph instead (also implied by --threshold/--top-k)")
    g = legacy.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, default=None, help="head-level: keep edges with |effect| >= T")
    g.add_argument("--top-k", type=int, default=None, help="head-level: keep the K strongest edges")
    legacy.add_argument("--keep", type=float, default=0.95,
                        help="head-level without --threshold/--top-k: the fewest edges keeping this share of |effect|")
    legacy.add_argument("--receivers", type=int, default=4, help="head-level: top heads used as path-patching receivers")
    p.set_defaults(func=cmd_circuit)

    r = sub.add_parser("run", help="the whole pipeline: probe -> patching -> path patching -> circuit -> report.html",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(r)
    r.add_argument("--out", type=Path, default=Path("runs/organism"), help="run directory")
    r.add_argument("--n-prompts", type=int, default=None,
                   help="prompts for the probe, 70/10/20 split (default: 2048, or 1024 for models over 64 heads)")
    r.add_argument("--layer", type=int, default=None,
                   help="probe layer to patch and draw (default: the layer with the best validation accuracy)")
    r.add_argument("--n-pairs", type=int, default=None,
                   help="clean/corrupted pairs for patching (default: 32, or 16 for models over 64 heads)")
    r.add_argument("--top-k", type=int, default=2, help="heads ablated together (resample ablation, refit probe)")
    r.add_argument("--n-random", type=int, default=10, help="random-head control draws")
    r.add_argument("--receivers", type=int, default=4, help="top heads used as path-patching receivers")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (half precision: see docs/engines.md for the tolerances)")
    r.add_argument("--screen", default="attribution", choices=["attribution", "exact"],
                   help="activation patching of heads: exact on the attribution-ranked candidates plus a random "
                        "audit (every head when the audit's rank correlation < 0.9), or exact on every head")
    r.add_argument("--png", action="store_true",
                   help="also write a PNG of every figure (one kaleido/Chromium batch at the end); the interactive "
                        "HTML figures and report.html are always written")
    c = r.add_argument_group("circuit stage")
    c.add_argument("--circuit", default="edges", choices=["edges", "heads"],
                   help="edge circuit (EAP-IG scores, faithfulness curve vs random), or the former head-level "
                        "path-patching graph")
    c.add_argument("--scores", default="eap-ig", choices=["eap", "eap-ig", "exact"], help="edge scores")
    c.add_argument("--ablation", default="counterfactual", choices=["counterfactual", "mean", "resample"],
                   help="value carried by the edges outside the circuit")
    c.add_argument("--target", type=float, default=0.8, help="faithfulness the reported circuit must reach")
    c.add_argument("--steps", type=int, default=5, help="integrated-gradient points (--scores eap-ig)")
    c.add_argument("--circuit-n-random", type=int, default=3, help="random edge sets per curve size")
    c.add_argument("--keep", type=float, default=0.95, help="--circuit heads: share of |effect| the pruned graph keeps")
    r.set_defaults(func=cmd_run)


def cmd_circuit(args: argparse.Namespace) -> int:
    if args.head_level or args.threshold is not None or args.top_k is not None:
        return cmd_head_circuit(args)
    from wordpos.circuit.edge_circuit import edge_circuit_stage
    from wordpos.patching.activation import prepare
    from wordpos.patching.corruptions import make_pairs
    from wordpos.patching.experiment import _vocab_for, load_probe
    from wordpos.probing.engines import make_engine
    from wordpos.probing.errors import ConfigError
    from wordpos.probing.io import prepare_run_dir

    if not 0 < args.target <= 1:
        raise ConfigError(f"--target is a faithfulness in (0, 1], got {args.target}.")
    if args.n_pairs < 2 or args.steps < 1 or args.n_random < 0:
        raise ConfigError(f"need --n-pairs >= 2, --steps >= 1 and --n-random >= 0; got {args.n_pairs}, {args.steps}, "
                          f"{args.n_random}.")
    probe, probe_dir = load_probe(args.probe)
    config = {"stage": "edge-circuit", "model": args.model, "probe": str(args.probe), "n_pairs": args.n_pairs,
              "scores": args.scores, "ablation": args.ablation, "target": args.target, "rule": args.rule,
              "steps": args.steps, "n_random": args.n_random, "node_baseline": args.node_baseline, "seed": args.seed}
    prepare_run_dir(args.out, config, overwrite=args.overwrite)
    if probe.model and probe.model != args.model:
        raise ConfigError(f"the probe in {args.probe} was fitted on {probe.model!r}, not {args.model!r}; pass the "
                          f"matching --model.")
    engine = make_engine(args.model, args.engine, args.device, args.remote)
    vocab = _vocab_for(probe_dir, engine.tokenizer, args.seed)
    pairs = make_pairs(engine.tokenizer, args.n_pairs, vocab=vocab, words="test", n_words=len(probe.classes_),
                       seed=args.seed)
    ctx = prepare(engine, pairs, probe, full_base_cache=True)  # the edge runner reads both runs' writers
    s = edge_circuit_stage(engine, ctx, args.out / "circuit", scores=args.scores, ablation=args.ablation,
                           target=args.target, steps=args.steps, n_random=args.n_random, progress=not args.quiet,
                           rule=args.rule, seed=args.seed, model_name=args.model,
                           node_baseline=None if args.node_baseline == "none" else args.node_baseline)
    f = s["faithfulness"]
    print(f"circuit: {s['edges']} edges ({s['percent_of_graph']:.2f}% of {s['n_valid_edges']}), "
          f"{'reached' if s['reached'] else 'did NOT reach'} target {s['target']:g}")
    print(f"faithfulness ({s['ablation']}): {f['share']:.3f} [{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]")
    inputs = s["head_inputs"]
    print(f"heads: {', '.join(f'{h}<{chr(44).join(inputs[h])}>' for h in s['heads']) or '-'}; "
          f"MLPs: {', '.join(str(m) for m in s['mlps']) or '-'}")
    print(f"CPR {s['cpr']:.3f} [{s['cpr_ci'][0]:.3f}, {s['cpr_ci'][1]:.3f}] vs random {s['random_cpr']:.3f}; "
          f"CMD {s['cmd']:.3f} vs random {s['random_cmd']:.3f}")
    print(f"wrote {args.out / 'circuit' / 'circuit.html'} and {args.out / 'circuit' / 'curve.html'}")
    return 0


def cmd_head_circuit(args: argparse.Namespace) -> int:
    """The former head-level circuit: path patching, a pruned head graph, mean-ablation faithfulness."""
    from wordpos.circuit.pipeline import RunConfig, build_circuit_stage
    from wordpos.patching.experiment import PatchConfig, run_patching
    from wordpos.probing.io import prepare_run_dir
    from wordpos.probing.engines import make_engine

    cfg = RunConfig(model=args.model, n_pairs=args.n_pairs, receivers=args.receivers, keep=args.keep,
                    threshold=args.threshold, circuit_top_k=args.top_k, seed=args.seed, device=args.device,
                    engine=args.engine, remote=args.remote)
    prepare_run_dir(args.out, {"stage": "circuit", "probe": str(args.probe), **cfg.identity()}, overwrite=args.overwrite)
    model = make_engine(args.model, args.engine, args.device, args.remote)
    common = dict(model=args.model, probe=str(args.probe), n_pairs=args.n_pairs, seed=args.seed, device=args.device,
                  receivers=args.receivers)
    run_patching(PatchConfig(method="path", **common), args.out / "patch_path", model=model, overwrite=args.overwrite,
                 progress=not args.quiet)
    run_patching(PatchConfig(method="activation", by_pos=False, **common), args.out / "patch_activation", model=model,
                 overwrite=args.overwrite, progress=not args.quiet)
    summary = build_circuit_stage(cfg, args.out, model=model, overwrite=args.overwrite, probe_path=args.probe)
    f = summary["faithfulness"]
    print(f"circuit: {summary['nodes']} nodes, {summary['edges']} edges, heads {', '.join(summary['heads'])}")
    print(f"faithfulness: {f.get('share', float('nan')):.1%} of the probe's above-baseline accuracy kept")
    print(f"wrote {args.out / 'circuit' / 'circuit.html'}")
    return 0


def _distinct_note(ab: dict) -> str:
    """`` (10 draws, 1 distinct set)`` when the random control's draws repeat (few other heads in those layers)."""
    n, d = len(ab.get("random_heads") or []), ab.get("random_distinct_sets")
    return f" ({n} draws, {d} distinct set{'s' if d != 1 else ''})" if d is not None and d < n else ""


def cmd_run(args: argparse.Namespace) -> int:
    from wordpos.circuit.pipeline import RunConfig, run_pipeline

    cfg = RunConfig(model=args.model, n_prompts=args.n_prompts, layer=args.layer, n_pairs=args.n_pairs, top_k=args.top_k,
                    n_random=args.n_random, receivers=args.receivers, keep=args.keep, seed=args.seed,
                    device=args.device, engine=args.engine, remote=args.remote, dtype=args.dtype,
                    screen=args.screen, circuit=args.circuit, circuit_scores=args.scores, circuit_ablation=args.ablation,
                    circuit_target=args.target, circuit_steps=args.steps, circuit_n_random=args.circuit_n_random,
                    png=args.png)
    res = run_pipeline(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    p = res.summary["probe"]
    print(f"probe: layer {p['layer']} accuracy {p['accuracy']:.1%} vs position-only {p['baseline_abs_pos_accuracy']:.1%}")
    ab = res.summary.get("ablation") or {}
    if ab:
        heads = ", ".join(f"{L}.{h}" for L, h in ab["heads"])
        rand = (f"; {len(ab['heads'])} random heads: {ab['random_refit_mean']:.1%}" + _distinct_note(ab)
                if ab.get("random_refit_mean") is not None else "; no random-head control (--n-random 0)")
        print(f"{ab['method']}-ablating {heads}: re-fitted probe {ab['refit_accuracy']:.1%} vs position-only "
              f"{ab['baseline_abs_pos_accuracy']:.1%}" + rand)
    c = res.summary["circuit"]
    f = c["faithfulness"]
    if "cpr" in c:  # the edge circuit
        print(f"circuit: {c['edges']} edges ({c['percent_of_graph']:.1f}% of the graph), f = {f['share']:.3f} "
              f"[{f['ci'][0]:.3f}, {f['ci'][1]:.3f}] ({c['ablation']} ablation, target {c['target']:g}"
              f"{'' if c['reached'] else ', NOT reached'}); CPR {c['cpr']:.3f} vs random {c['random_cpr']:.3f}")
        print(f"circuit heads: {', '.join(c['heads']) or '-'}; MLPs: {', '.join(str(m) for m in c['mlps']) or '-'}")
    else:
        print(f"circuit heads {', '.join(c['heads'])}; faithfulness {f.get('share', float('nan')):.1%}")
    print(f"wrote {args.out / 'report.html'}")
    return 0
