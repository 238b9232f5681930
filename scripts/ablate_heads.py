"""Ablate a set of heads and see how far the word-index probe falls toward the position-only baseline,
against random heads from the same layers. A starting point for researchers to adapt.

    python scripts/ablate_heads.py --model organism --probe runs/organism --heads 1.2,2.0 --method mean
    # the top-k curve: heads ranked by activation patching in a `wordpos run` directory, k = 1, 2, 4, 8
    python scripts/ablate_heads.py --model smollm2-135m --from-run runs/smollm2 --curve 1,2,4,8 --n-random 2 \\
        --n-prompts 768 --out runs/smollm2/ablation_curve.json
"""

from __future__ import annotations

import argparse
import json


def ranked_from_run(run: str, n: int) -> list[str]:
    """The ``n`` heads with the largest |activation-patching effect| in a ``wordpos run`` directory."""
    from pathlib import Path

    from wordpos.patching.results import EffectResult

    return [h["head"] for h in EffectResult.load(Path(run) / "patch_activation").top_heads(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--probe", default=None, help="probe directory or run directory (default: --from-run's probe)")
    ap.add_argument("--heads", default=None, help="LAYER.HEAD list, e.g. 3.4,2.1 (ranked, for --curve)")
    ap.add_argument("--from-run", default=None, help="rank heads by activation patching in this `wordpos run` dir")
    ap.add_argument("--curve", default=None, help="ablate the top k of the ranked heads for each k, e.g. 1,2,4,8")
    ap.add_argument("--method", default="resample", choices=["zero", "mean", "resample"])
    ap.add_argument("--n-random", type=int, default=10, help="random head sets for the control")
    ap.add_argument("--n-prompts", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="write the result (JSON, with the command's settings) here")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args()
    if not args.heads and not args.from_run:
        ap.error("pass --heads LAYER.HEAD,... or --from-run RUN_DIR")
    probe_arg = args.probe or (f"{args.from_run}/probe" if args.from_run else None)
    if probe_arg is None:
        ap.error("pass --probe (a probe or run directory)")
    ks = sorted({int(k) for k in args.curve.split(",")}) if args.curve else None

    from wordpos.patching import ablate_heads
    from wordpos.patching.ablation import ablation_curve
    from wordpos.patching.experiment import _vocab_for, load_probe
    from wordpos.probing import DatasetConfig, WordIndexDataset, as_engine, load_model
    from wordpos.probing.io import versions, write_json

    probe, probe_dir = load_probe(probe_arg)
    engine = as_engine(load_model(args.model, device=args.device))
    vocab = _vocab_for(probe_dir, engine.tokenizer, args.seed)
    data = WordIndexDataset.generate(engine.tokenizer, DatasetConfig(n_prompts=args.n_prompts,
                                                                     n_words=len(probe.classes_), seed=args.seed),
                                     vocab=vocab)
    heads = args.heads.split(",") if args.heads else ranked_from_run(args.from_run, max(ks or [2]))
    record = {"config": {**vars(args), "ranked_heads": heads}, "model": args.model, "versions": versions()}
    if ks:
        rows = ablation_curve(engine, probe, data, heads, ks, method=args.method, n_random=args.n_random, seed=args.seed)
        record["curve"] = rows
        print(f"{args.method}-ablating the top k heads (probe at layer {probe.layer}, {rows[0]['n_samples']} "
              f"held-out-word samples; clean {rows[0]['clean_accuracy']:.3f}, position baseline "
              f"{rows[0]['baseline_abs_pos_accuracy']:.3f})")
        print("   k  fixed probe  refit probe  random k (fixed)  random k (refit)")
        for r in rows:
            print(f"  {r['k']:>2}  {r['accuracy']:>11.3f}  {r['refit_accuracy']:>11.3f}  {r['random_mean']:>16.3f}  "
                  f"{r['random_refit_mean']:>16.3f}   {','.join(r['heads'])}")
    else:
        res = ablate_heads(engine, probe, data, heads, method=args.method, n_random=args.n_random, seed=args.seed)
        d = res.to_dict()
        record["ablation"] = d
        if args.json:
            print(json.dumps(d, indent=2))
        else:
            print(f"{args.method}-ablating {', '.join(f'{L}.{h}' for L, h in res.heads)} (probe at layer "
                  f"{probe.layer}, {res.n_samples} held-out-word samples)")
            print(f"  probe accuracy, nothing ablated:  {res.clean_accuracy:.3f}")
            print(f"  probe accuracy, heads ablated:    {res.accuracy:.3f}   (drop {res.drop:+.3f})")
            print(f"  re-fitted probe, heads ablated:   {res.refit_accuracy:.3f}")
            print(f"  position-only baseline:           {res.baseline_abs_pos_accuracy:.3f}   "
                  f"(gap {res.gap_to_baseline:+.3f})")
            if res.random_accuracies:
                print(f"  {len(res.heads)} random heads, same layers:   {d['random_mean']:.3f} +/- {d['random_std']:.3f} "
                      f"(re-fitted {d['random_refit_mean']:.3f}) over {len(res.random_accuracies)} draws")
    if args.out:
        write_json(args.out, record)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
