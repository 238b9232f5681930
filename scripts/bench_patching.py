"""Benchmark: the same head x position activation-patching sweep with TransformerLens' per-patch
functions and with wordpos' batched engine, in one run; prints the wall-time ratio and the max abs
difference, then attribution patching's speed-up and correlation.

    python scripts/bench_patching.py --model organism --n-pairs 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--n-pairs", type=int, default=16)
    ap.add_argument("--n-prompts", type=int, default=600, help="prompts for fitting the probe")
    ap.add_argument("--layer", type=int, default=None, help="probe layer (default: the last)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import transformer_lens.patching as tl_patching

    from wordpos.patching import attribute_heads, correlation, make_pairs, patch_heads, prepare
    from wordpos.probing import WordIndexDataset, WordIndexProbe, as_engine, collect_residuals, hooks, load_model

    model = load_model(args.model, device=args.device)
    engine = as_engine(model)
    layer = engine.dims.n_layers - 1 if args.layer is None else args.layer
    data = WordIndexDataset.default(engine.tokenizer, n_prompts=args.n_prompts, seed=args.seed)
    acts = collect_residuals(engine, data, layers=[layer], progress=False)
    probe = WordIndexProbe(layer=layer, model=engine.name).fit(acts.train(layer), acts.labels["train"])
    pairs = make_pairs(engine.tokenizer, args.n_pairs, vocab=data.vocab, seed=args.seed).to(engine.device)
    ctx = prepare(engine, pairs, probe)
    print(f"model {args.model}: {engine.dims.n_layers} layers x {engine.dims.n_heads} heads, probe layer {layer}, "
          f"{len(pairs)} pairs of {pairs.clean.shape[1]} tokens, device {engine.device}, "
          f"{torch.get_num_threads()} threads")

    holder = {}
    model.add_hook(hooks.resid(layer), lambda act, hook: holder.__setitem__("r", act))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(pairs.clean)

    def metric(logits):
        return ctx.metric(holder["r"])[0]

    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync(); t0 = time.perf_counter()
        ref = tl_patching.get_act_patch_attn_head_out_by_pos(model, pairs.corrupted, clean_cache, metric)
        sync(); t_tl = time.perf_counter() - t0
    model.reset_hooks()
    n_patches = ref.numel()
    sync(); t0 = time.perf_counter()
    ours = patch_heads(engine, ctx, by_pos=True, progress=False)
    sync(); t_ours = time.perf_counter() - t0
    rows = ref.shape[0]  # TL sweeps every layer; heads after the probe's layer have exactly zero effect
    diff = np.abs(ours.effects - ref.double().permute(0, 2, 1).numpy()[:ctx.stop_at_layer]).max()
    tail = float(ref[ctx.stop_at_layer:].abs().max()) if rows > ctx.stop_at_layer else 0.0
    print(f"head x position sweep, {n_patches} patches:")
    print(f"  TransformerLens per-patch:  {t_tl:8.2f} s")
    print(f"  wordpos batched:            {t_ours:8.2f} s")
    print(f"  speed-up:                   {t_tl / t_ours:8.1f}x")
    print(f"  max abs difference:         {diff:.2e}   (TL's rows after the probe layer: max |effect| {tail:.1e})")

    sync(); t0 = time.perf_counter()
    act = patch_heads(engine, ctx, progress=False)
    sync(); t_act = time.perf_counter() - t0
    sync(); t0 = time.perf_counter()
    att = attribute_heads(engine, ctx)
    sync(); t_att = time.perf_counter() - t0
    print(f"per-head sweep: activation {t_act:.3f} s, attribution {t_att:.3f} s "
          f"(speed-up {t_act / t_att:.1f}x), correlation {correlation(att, act):.3f}")
    att_pos = attribute_heads(engine, ctx, by_pos=True)
    print(f"per-head-and-position: attribution {t_tl / max(t_att, 1e-9):.0f}x faster than TL's loop, "
          f"correlation with activation patching {correlation(att_pos, ours):.3f}")


if __name__ == "__main__":
    main()
