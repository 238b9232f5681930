"""Ablate a set of heads and see how far the word-index probe falls toward the position-only baseline,
against random heads from the same layers. A starting point for researchers to adapt.

    python scripts/ablate_heads.py --model organism --probe runs/organism --heads 1.2,2.0 --method mean
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--probe", required=True, help="probe directory or `wordpos probe` run directory")
    ap.add_argument("--heads", required=True, help="LAYER.HEAD list, e.g. 3.4,2.1")
    ap.add_argument("--method", default="mean", choices=["zero", "mean", "resample"])
    ap.add_argument("--n-random", type=int, default=10, help="random head sets for the control")
    ap.add_argument("--n-prompts", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args()

    from patching import ablate_heads
    from patching.experiment import _vocab_for, load_probe
    from probing import DatasetConfig, WordIndexDataset, as_engine, load_model

    probe, probe_dir = load_probe(args.probe)
    engine = as_engine(load_model(args.model, device=args.device))
    vocab = _vocab_for(probe_dir, engine.tokenizer, args.seed)
    data = WordIndexDataset.generate(engine.tokenizer, DatasetConfig(n_prompts=args.n_prompts,
                                                                     n_words=len(probe.classes_), seed=args.seed),
                                     vocab=vocab)
    res = ablate_heads(engine, probe, data, args.heads, method=args.method, n_random=args.n_random, seed=args.seed)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return
    d = res.to_dict()
    print(f"{args.method}-ablating {', '.join(f'{L}.{h}' for L, h in res.heads)} (probe at layer {probe.layer}, "
          f"{res.n_samples} held-out-word samples)")
    print(f"  probe accuracy, nothing ablated:  {res.clean_accuracy:.3f}")
    print(f"  probe accuracy, heads ablated:    {res.accuracy:.3f}   (drop {res.drop:+.3f})")
    print(f"  position-only baseline:           {res.baseline_abs_pos_accuracy:.3f}   (gap {res.gap_to_baseline:+.3f})")
    if res.random_accuracies:
        print(f"  {len(res.heads)} random heads, same layers:   {d['random_mean']:.3f} +/- {d['random_std']:.3f} "
              f"over {len(res.random_accuracies)} draws")


if __name__ == "__main__":
    main()
