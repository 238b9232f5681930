"""Reproduce the original experiment (Nanda & Gurnee, 2023) on GPT-2 Small, then look for its heads.

For a machine that reaches the Hugging Face hub (or has `gpt2` in its HF cache), ideally with a GPU:

    python scripts/reproduce_post.py --device cuda --out runs/gpt2-post

Reference recipe: the 19-token Declaration prefix, 7 random lowercase words of 1-3 tokens, 4096 prompts, probe on
the residual stream after block 3 (and every other layer), position-only baseline ~54.6%. Then patching,
ablation and the circuit at layer 3, as `wordpos run --model gpt2 --layer 3` would. Without the hub or a cached
copy it stops with one clear error; nothing is faked.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--layer", type=int, default=3, help="the post's layer: residual stream after block 3")
    ap.add_argument("--n-prompts", type=int, default=4096)
    ap.add_argument("--n-pairs", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/gpt2-post"))
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()

    from wordpos.circuit.pipeline import RunConfig, run_pipeline
    from wordpos.probing.errors import WordposError

    cfg = RunConfig(model=args.model, n_prompts=args.n_prompts, n_pairs=args.n_pairs, layer=args.layer,
                    seed=args.seed, device=args.device)
    try:
        res = run_pipeline(cfg, args.out, overwrite=args.overwrite)
    except WordposError as e:
        raise SystemExit(f"reproduce_post: {e}") from None
    p = res.summary["probe"]
    layer3 = p["per_layer_accuracy"].get(str(args.layer), p["per_layer_accuracy"].get(args.layer))
    print(f"layer {args.layer}: {layer3:.1%} on held-out words; best layer {p['layer']}: {p['accuracy']:.1%}; "
          f"position-only baseline {p['baseline_abs_pos_accuracy']:.1%} (post: ~54.6%)")
    print(f"report: {args.out / 'report.html'}")


if __name__ == "__main__":
    main()
