"""Benchmark: the ablation stage (each candidate head alone, then the top-k heads together and ``n_random`` random
k-sets, on the test split, plus the ablated train activations for the refits) against a plain forward over the same
prompts, in one run. Prints the token-layer rates and their ratio (acceptance: >= 0.7 on SmolLM2); the probe refits
are timed apart and not counted. With ``--out`` writes the numbers as JSON.

    python scripts/bench_ablation.py --model smollm2-135m --n-prompts 200 --candidates 8 --n-random 4 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-prompts", type=int, default=200, help="prompts in total (70%% train, 20%% test)")
    ap.add_argument("--layer", type=int, default=3, help="probe layer")
    ap.add_argument("--candidates", type=int, default=8, help="heads ablated one by one")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--n-random", type=int, default=4)
    ap.add_argument("--method", default="resample", choices=["zero", "mean", "resample"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()

    import numpy as np
    import torch

    from wordpos.patching.ablation import ablate_heads, ablated_sets, head_means
    from wordpos.patching.sizing import Sizing
    from wordpos.probing import WordIndexDataset, WordIndexProbe, as_engine, collect_residuals, load_model

    engine = as_engine(load_model(args.model, device=args.device))
    sizing = Sizing()
    L = args.layer
    data = WordIndexDataset.default(engine.tokenizer, n_prompts=args.n_prompts, seed=args.seed)
    acts = collect_residuals(engine, data, layers=[L], progress=False)
    probe = WordIndexProbe(layer=L, model=engine.name).fit(acts.train(L), acts.labels["train"])
    test, train = data.test, data.train
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def plain(prompts, repeats: int) -> tuple[float, int]:
        """Plain forwards to the probe's layer over ``prompts`` in the sizing's prompt batches."""
        T = prompts.max_len()
        b = min(len(prompts), sizing.prompts_per_batch(engine.device), max(1, sizing.tokens_per_forward(engine.device) // T))
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(repeats):
                for s in range(0, len(prompts), b):
                    engine.run(prompts.tokens[s:s + b, :T].to(engine.device), stop_at_layer=L + 1)
        sync()
        return time.perf_counter() - t0, repeats * len(prompts) * T * (L + 1)

    plain(test, 1)  # warm-up
    heads = [(lay, h) for lay in range(L + 1) for h in range(engine.dims.n_heads)]
    rng = np.random.default_rng(args.seed)
    cands = [heads[i] for i in rng.choice(len(heads), size=min(args.candidates, len(heads)), replace=False)]
    means = head_means(engine, train, list(range(L + 1)), length=max(test.max_len(), train.max_len())) \
        if args.method == "mean" else None
    sync()
    t0 = time.perf_counter()
    preds = ablated_sets(engine, L, test, [[]] + [[h] for h in cands], args.method, means, seed=args.seed, probe=probe,
                         progress=False).numpy()
    sync()
    sweep_s = time.perf_counter() - t0
    sweep_tl = (len(cands) + 1) * len(test) * test.max_len() * (L + 1)
    y = test.labels.numpy()
    drops = [float(np.mean(preds[0] == y) - np.mean(p == y)) for p in preds[1:]]
    top = [cands[i] for i in np.argsort(drops)[::-1][:args.top_k]]
    res = ablate_heads(engine, probe, data, top, method=args.method, n_random=args.n_random, seed=args.seed,
                       progress=False)
    t = res.config["timings"]
    sets = 2 + args.n_random  # unablated, top-k, random k-sets on the test split; all but the first on train
    stage_tl = (sets * len(test) * test.max_len() + (sets - 1) * len(train) * train.max_len()) * (L + 1)
    abl_s = sweep_s + t["forward_s"]
    abl_rate = (sweep_tl + stage_tl) / abl_s
    # the plain forward over the same prompts, as many times as the ablation ran them
    p1, tl1 = plain(test, len(cands) + 1 + sets)
    p2, tl2 = plain(train, sets - 1)
    plain_rate = (tl1 + tl2) / (p1 + p2)
    out = {"model": args.model, "device": str(engine.device), "layer": L, "method": args.method,
           "n_test": len(test), "n_train": len(train), "candidates": len(cands), "top_k": args.top_k,
           "n_random": args.n_random, "ablation_forward_s": abl_s, "refit_s": t["refit_s"],
           "ablation_token_layers_per_s": abl_rate, "plain_forward_s": p1 + p2,
           "plain_token_layers_per_s": plain_rate, "ratio": abl_rate / plain_rate,
           "top_heads": [f"{a}.{b}" for a, b in top], "accuracy": res.accuracy, "clean_accuracy": res.clean_accuracy}
    print(f"{args.model} on {engine.device}: ablation {abl_rate:,.0f} token-layers/s ({abl_s:.1f} s, refits "
          f"{t['refit_s']:.1f} s apart), plain forward {plain_rate:,.0f} token-layers/s; ratio {out['ratio']:.2f} "
          f"(target >= 0.7)")
    if args.out:
        from wordpos.probing.io import write_json

        write_json(args.out, out)


if __name__ == "__main__":
    main()
