"""``wordpos circuit`` and ``wordpos run``."""

from __future__ import annotations

import argparse
from pathlib import Path

from probing.cli import add_common_model_args


def add_circuit_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("circuit", help="path-patch the probe's heads and draw the pruned circuit",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(p)
    p.add_argument("--probe", required=True, type=Path, help="probe directory (or a `wordpos probe` run directory)")
    p.add_argument("--out", required=True, type=Path)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, default=None, help="keep edges with |effect| >= T")
    g.add_argument("--top-k", type=int, default=None, help="keep the K strongest edges")
    p.add_argument("--keep", type=float, default=0.95,
                   help="without --threshold/--top-k: the fewest edges keeping this share of the |effect|")
    p.add_argument("--n-pairs", type=int, default=32)
    p.add_argument("--receivers", type=int, default=4, help="top heads used as path-patching receivers")
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
    r.add_argument("--keep", type=float, default=0.95, help="share of |effect| the pruned circuit keeps")
    r.set_defaults(func=cmd_run)


def cmd_circuit(args: argparse.Namespace) -> int:
    from circuit.pipeline import RunConfig, build_circuit_stage
    from patching.experiment import PatchConfig, run_patching
    from probing.io import prepare_run_dir
    from probing.engine import make_engine

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


def cmd_run(args: argparse.Namespace) -> int:
    from circuit.pipeline import RunConfig, run_pipeline

    cfg = RunConfig(model=args.model, n_prompts=args.n_prompts, layer=args.layer, n_pairs=args.n_pairs, top_k=args.top_k,
                    n_random=args.n_random, receivers=args.receivers, keep=args.keep, seed=args.seed,
                    device=args.device, engine=args.engine, remote=args.remote)
    res = run_pipeline(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    p = res.summary["probe"]
    print(f"probe: layer {p['layer']} accuracy {p['accuracy']:.1%} vs position-only {p['baseline_abs_pos_accuracy']:.1%}")
    ab = res.summary.get("ablation") or {}
    if ab:
        heads = ", ".join(f"{L}.{h}" for L, h in ab["heads"])
        print(f"{ab['method']}-ablating {heads}: re-fitted probe {ab['refit_accuracy']:.1%} vs position-only "
              f"{ab['baseline_abs_pos_accuracy']:.1%}; {len(ab['heads'])} random heads: {ab['random_refit_mean']:.1%}")
    f = res.summary["circuit"]["faithfulness"]
    print(f"circuit heads {', '.join(res.summary['circuit']['heads'])}; faithfulness {f.get('share', float('nan')):.1%}")
    print(f"wrote {args.out / 'report.html'}")
    return 0
