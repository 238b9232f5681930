"""``wordpos patch``: a thin shell over :func:`patching.experiment.run_patching`; the methods and their options
come from the registry (:mod:`wordpos.patching.registry`)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from wordpos.probing.cli import add_common_model_args


def add_patch_parser(sub: argparse._SubParsersAction) -> None:
    from wordpos.patching import registry
    from wordpos.patching.config import PatchConfig

    defaults = {f.name: f.default for f in fields(PatchConfig)}
    methods = registry.methods(cli_only=True)
    p = sub.add_parser("patch", help="find the heads behind the probe: " + ", ".join(methods),
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(p)
    p.add_argument("--probe", required=True, type=Path,
                   help="probe directory, the run directory of `wordpos probe`, or a `wordpos run` directory")
    p.add_argument("--method", default="activation", choices=list(methods),
                   help="; ".join(f"{k}: {v.help}" for k, v in methods.items()))
    p.add_argument("--out", required=True, type=Path)
    for o in registry.cli_options():
        used = [k for k, v in methods.items() if o.dest in v.options]
        helptext = f"{o.help} ({', '.join(used)})"
        if o.action:
            p.add_argument(o.flag, dest=o.dest, action=o.action, help=helptext)
        else:
            p.add_argument(o.flag, dest=o.dest, type=o.type, choices=o.choices, default=defaults[o.dest],
                           help=helptext)
    p.set_defaults(func=cmd_patch)


def cmd_patch(args: argparse.Namespace) -> int:
    from wordpos.patching import registry
    from wordpos.patching.experiment import PatchConfig, run_patching

    opts = {o.dest: getattr(args, o.dest) for o in registry.cli_options()}
    cfg = PatchConfig(model=args.model, probe=str(args.probe), method=args.method, seed=args.seed, device=args.device,
                      engine=args.engine, remote=args.remote, **opts)
    run = run_patching(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"  {run.summary['direction']}: signed change from the unpatched run")
    for h in run.summary["top_heads"][:5]:
        print(f"  head {h['head']:>6}  change {h['effect']:+.3f}  role: {h['role']}")
    print(f"wrote {args.out / 'effects.npz'}")
    return 0
