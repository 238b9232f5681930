"""Benchmark: residual collection (hooks at every layer, gather, copy to host) against a plain forward pass
of the same model over the same batches, in one run; prints tokens/s and the hook-overhead ratio
(aim <= 1.15x), then the probe's fit time.

    python scripts/bench_probe.py --model organism --n-prompts 2048
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--n-prompts", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from wordpos.probing import WordIndexDataset, WordIndexProbe, as_engine, collect_residuals, load_model

    model = load_model(args.model, device=args.device)
    engine = as_engine(model)
    data = WordIndexDataset.default(engine.tokenizer, n_prompts=args.n_prompts, seed=0)
    n_layers = engine.dims.n_layers
    splits = ("train", "val", "test")
    n_tokens = int(sum(data.split(s).lengths.sum() for s in splits))
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def plain() -> None:
        for s in splits:
            ps = data.split(s)
            for b0 in range(0, len(ps), args.batch_size):
                width = int(ps.lengths[b0:b0 + args.batch_size].max())
                toks = ps.tokens[b0:b0 + args.batch_size, :width].to(engine.device)
                engine.run(toks, stop_at_layer=n_layers)  # same depth, no caching hooks

    def collect():
        return collect_residuals(engine, data, layers="all", batch_size=args.batch_size, progress=False)

    plain(); collect()  # warm-up
    t_plain, t_coll = [], []
    for _ in range(args.repeats):  # interleaved, best of N, so drift hits both alike
        sync(); t0 = time.perf_counter(); plain(); sync(); t_plain.append(time.perf_counter() - t0)
        sync(); t0 = time.perf_counter(); acts = collect(); sync(); t_coll.append(time.perf_counter() - t0)
    tp, tc = min(t_plain), min(t_coll)
    print(f"model {args.model} on {engine.device} ({torch.get_num_threads()} threads): {len(data.train) + len(data.val) + len(data.test)} "
          f"prompts, {n_tokens} tokens, {n_layers} layers cached")
    print(f"  plain forward:        {n_tokens / tp:10.0f} tokens/s")
    print(f"  collect_residuals:    {n_tokens / tc:10.0f} tokens/s")
    print(f"  hook overhead ratio:  {tc / tp:10.3f}x   (aim <= 1.15x)")
    layer = n_layers - 1
    t0 = time.perf_counter()
    probe = WordIndexProbe(layer=layer).fit(acts.train(layer), acts.labels["train"])
    t_fit = time.perf_counter() - t0
    print(f"  probe fit (layer {layer}, {len(acts.labels['train'])} samples x {engine.dims.d_model} dims): {t_fit:.2f} s, "
          f"held-out accuracy {probe.score(acts.test(layer), acts.labels['test']):.3f}")


if __name__ == "__main__":
    main()
