"""Benchmark: the same work through both engines, locally, in one run — residual collection at every layer
and a per-head activation-patching sweep — printing each time, the nnsight/TransformerLens ratio and the
max abs difference of the results.

    python scripts/bench_engines.py --model organism
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--n-prompts", type=int, default=512)
    ap.add_argument("--n-pairs", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from wordpos.patching import make_pairs, patch_heads, prepare
    from wordpos.probing import WordIndexDataset, WordIndexProbe, collect_residuals
    from wordpos.probing.engines import make_engine

    tl = make_engine(args.model, "tl", args.device)
    nn = make_engine(tl.model, "nnsight")  # same weights, no second load
    data = WordIndexDataset.default(tl.tokenizer, n_prompts=args.n_prompts, seed=0)
    layer = tl.dims.n_layers - 1
    print(f"model {args.model} on {tl.device}, {torch.get_num_threads()} threads")
    rows = []
    t_tl, a_tl = _best(lambda: collect_residuals(tl, data, progress=False), args.repeats)
    t_nn, a_nn = _best(lambda: collect_residuals(nn, data, progress=False), args.repeats)
    diff = float(max((a_tl.test(L) - a_nn.test(L)).abs().max() for L in a_tl.layers))
    rows.append(("collect_residuals (all layers)", t_tl, t_nn, diff))
    probe = WordIndexProbe(layer=layer, model=tl.name).fit(a_tl.train(layer), a_tl.labels["train"])
    pairs = make_pairs(tl.tokenizer, args.n_pairs, vocab=data.vocab, seed=0)
    ctx_tl, ctx_nn = prepare(tl, pairs, probe), prepare(nn, pairs, probe)
    t_tl, r_tl = _best(lambda: patch_heads(tl, ctx_tl, by_pos=True, progress=False), args.repeats)
    t_nn, r_nn = _best(lambda: patch_heads(nn, ctx_nn, by_pos=True, progress=False), args.repeats)
    rows.append(("head x position patching", t_tl, t_nn, float(np.abs(r_tl.effects - r_nn.effects).max())))
    print(f"{'work':<34}{'TL s':>9}{'nnsight s':>11}{'ratio':>8}{'max |diff|':>12}")
    for name, a, b, d in rows:
        print(f"{name:<34}{a:9.3f}{b:11.3f}{b / a:8.2f}{d:12.2e}")


if __name__ == "__main__":
    main()
