"""``wordpos patch``: a thin shell over :func:`patching.experiment.run_patching`."""

from __future__ import annotations

import argparse
from pathlib import Path

from probing.cli import add_common_model_args


def add_patch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patch", help="find the heads behind the probe: activation/path/attribution patching, ablation",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(p)
    p.add_argument("--probe", required=True, type=Path, help="probe directory (or the run directory of `wordpos probe`)")
    p.add_argument("--method", default="activation", choices=["activation", "path", "attribution", "ablation"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--metric", default="logit_diff", choices=["logit_diff", "projection", "accuracy"])
    p.add_argument("--direction", default="denoising", choices=["denoising", "noising"])
    p.add_argument("--n-pairs", type=int, default=64, help="clean/corrupted pairs")
    p.add_argument("--corruption", default="split", choices=["split", "merge"],
                   help="split: one 3-token word -> three 1-token words (indices +2); merge: the reverse")
    p.add_argument("--no-by-pos", dest="by_pos", action="store_false", help="skip the head x position sweep")
    p.add_argument("--ablation", default="resample", choices=["zero", "mean", "resample"])
    p.add_argument("--top-k", type=int, default=2, help="heads ablated together (ablation method)")
    p.add_argument("--n-random", type=int, default=10, help="random-head control draws (ablation method)")
    p.add_argument("--receivers", type=int, default=6, help="top heads used as path-patching receivers")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batched forward (default by device)")
    p.set_defaults(func=cmd_patch)


def cmd_patch(args: argparse.Namespace) -> int:
    from patching.experiment import PatchConfig, run_patching

    cfg = PatchConfig(model=args.model, probe=str(args.probe), method=args.method, metric=args.metric,
                      direction=args.direction, n_pairs=args.n_pairs, corruption=args.corruption, by_pos=args.by_pos,
                      ablation=args.ablation, top_k=args.top_k, n_random=args.n_random, receivers=args.receivers,
                      seed=args.seed, device=args.device, max_tokens=args.max_tokens, engine=args.engine,
                      remote=args.remote)
    run = run_patching(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    for h in run.summary["top_heads"][:5]:
        print(f"  head {h['head']:>6}  effect {h['effect']:+.3f}  role: {h['role']}")
    print(f"wrote {args.out / 'effects.npz'}")
    return 0
