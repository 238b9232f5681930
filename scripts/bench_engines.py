"""Benchmark: the same work through both engines, locally, in one run — residual collection at every layer, the
head × position and residual × position activation-patching sweeps and resample ablation — printing each time, the
nnsight/TransformerLens ratio and the max abs difference of the results. Each patching row is timed on the base
run's cached keys/values (the default) and over full prompts (``prepare(..., reuse_prefix=False)``), so the gain of
skipping the positions before a patch shows on each engine.

    python scripts/bench_engines.py --model organism
    python scripts/bench_engines.py --model smollm2-135m --layer 1
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
    ap.add_argument("--layer", type=int, default=None, help="probe layer (default: the last)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from wordpos.patching import make_pairs, patch_heads, patch_resid, prepare
    from wordpos.patching.ablation import ablated_sets
    from wordpos.probing import WordIndexDataset, WordIndexProbe, collect_residuals
    from wordpos.probing.engines import make_engine

    tl = make_engine(args.model, "tl", args.device)
    nn = make_engine(tl.model, "nnsight")  # same weights, no second load
    engines = {"tl": tl, "nnsight": nn}
    data = WordIndexDataset.default(tl.tokenizer, n_prompts=args.n_prompts, seed=0)
    layer = tl.dims.n_layers - 1 if args.layer is None else args.layer
    print(f"model {args.model} on {tl.device}, {torch.get_num_threads()} threads, probe layer {layer}")
    rows = []
    t_tl, a_tl = _best(lambda: collect_residuals(tl, data, progress=False), args.repeats)
    t_nn, a_nn = _best(lambda: collect_residuals(nn, data, progress=False), args.repeats)
    diff = float(max((a_tl.test(L) - a_nn.test(L)).abs().max() for L in a_tl.layers))
    rows.append(("collect_residuals (all layers)", t_tl, t_nn, diff))
    probe = WordIndexProbe(layer=layer, model=tl.name).fit(a_tl.train(layer), a_tl.labels["train"])
    pairs = make_pairs(tl.tokenizer, args.n_pairs, vocab=data.vocab, seed=0)
    sweeps = {"head x position": lambda e, c: patch_heads(e, c, by_pos=True, progress=False).effects,
              "residual x position": lambda e, c: patch_resid(e, c, progress=False).effects}
    reference = {}
    for reuse in (True, False):
        how = "cached prefix" if reuse else "full prompts"
        for what, sweep in sweeps.items():
            # a context remembers its sweeps: each repeat gets a fresh one (its base run is timed with it)
            t = {k: _best(lambda e=e: sweep(e, prepare(e, pairs, probe, reuse_prefix=reuse)), args.repeats)
                 for k, e in engines.items()}
            reference.setdefault(what, t["tl"][1])
            d = max(float(np.nanmax(np.abs(t[k][1] - reference[what]))) for k in engines)
            rows.append((f"{what}, {how}", t["tl"][0], t["nnsight"][0], d))
        sets = [[], *[[(layer, h)] for h in range(min(3, tl.dims.n_heads))]]
        t = {k: _best(lambda e=e: ablated_sets(e, layer, data.test, sets, "resample", seed=1, skip=reuse),
                      args.repeats) for k, e in engines.items()}
        reference.setdefault("ablation", t["tl"][1])
        d = max(float((t[k][1] - reference["ablation"]).abs().max()) for k in engines)
        rows.append((f"resample ablation, {'skipping' if reuse else 'full prompts'}", t["tl"][0], t["nnsight"][0], d))
    print(f"{'work':<40}{'TL s':>9}{'nnsight s':>11}{'ratio':>8}{'max |diff|':>12}")
    for name, a, b, d in rows:
        print(f"{name:<40}{a:9.3f}{b:11.3f}{b / a:8.2f}{d:12.2e}")
    print("max |diff|: both engines against TransformerLens on cached keys/values (the first row of each kind)")


if __name__ == "__main__":
    main()
