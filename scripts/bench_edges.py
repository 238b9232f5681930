"""Benchmark of edge-level circuits on SmolLM2-135M (probe at layer 19, 32 pairs, CPU).

Times, each beside a plain forward over the same prompts:
  1. EAP-IG (5 steps) over the whole graph up to the probe's layer (target <= 2 min on 2 CPU cores);
  2. one ``evaluate_masks`` call for 40 circuits: the ten-point curve (top edges by EAP-IG) plus 3 random edge sets
     per size (target <= 3 min).
It also prints the faithfulness of each top-k circuit and of the random sets.

    .venv/bin/python scripts/bench_edges.py [--probe DIR] [--pairs 32] [--threads 2] [--device cpu]

``--probe`` is a probe directory (``probe.json`` + ``probe.npz``) or a ``wordpos probe`` run directory; without it
the script fits one at layer 19 on 512 prompts first (not timed).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def find_probe(path: Path):
    from wordpos.probing import WordIndexProbe

    if (path / "probe.json").exists():
        return WordIndexProbe.load(path)
    hits = sorted(p.parent for p in path.rglob("probe.json"))
    hits = [h for h in hits if "19" in h.name] or hits
    if not hits:
        raise SystemExit(f"no probe.json under {path}")
    return WordIndexProbe.load(hits[0])


def fit_probe(model, layer: int, n_prompts: int, seed: int):
    from wordpos.probing import WordIndexDataset, WordIndexProbe, as_engine, collect_residuals

    data = WordIndexDataset.default(model.tokenizer, n_prompts=n_prompts, seed=seed)
    acts = collect_residuals(model, data, layers=[layer], progress=False)
    return WordIndexProbe(layer=layer, model=as_engine(model).name).fit(acts.train(layer), acts.labels["train"])


CPU: dict[str, float] = {}


def timed(fn, *a, **k):
    """Wall seconds; the process CPU seconds go into CPU[fn name] (on a shared machine, CPU seconds / threads is
    what the wall time would be with the cores to itself)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    CPU[getattr(fn, "__name__", "fn")] = time.process_time() - c
    return out, time.perf_counter() - t


def cpu_note(name: str, threads: int) -> str:
    return f"[CPU {CPU[name]:.1f} s = {CPU[name] / threads:.1f} s on {threads} idle cores]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--probe", type=Path, default=None)
    ap.add_argument("--layer", type=int, default=19)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--n-random", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-share-prefix", action="store_true",
                    help="run full prompts in every patched forward (the pre-shared-prefix path) for comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from wordpos.patching import make_pairs, prepare
    from wordpos.patching.eap import score_edges
    from wordpos.patching.edge_runner import EdgeRunner, tokens_per_forward
    from wordpos.probing import as_engine, load_model

    model = load_model(args.model, device=args.device)
    engine = as_engine(model)
    probe = find_probe(args.probe) if args.probe else fit_probe(model, args.layer, 512, args.seed)
    pairs = make_pairs(model.tokenizer, args.pairs, seed=args.seed)
    ctx = prepare(model, pairs, probe)
    L = int(probe.layer)
    B, T = pairs.clean.shape
    print(f"model {engine.name} on {engine.device} ({torch.get_num_threads()} threads), probe layer {L}, "
          f"{B} pairs x {T} tokens; metric clean {ctx.metric.clean_value:.3f} corrupted {ctx.metric.corrupted_value:.3f}")

    with torch.no_grad():
        engine.run(pairs.clean[:2], stop_at_layer=L + 1)  # warm-up
        _, t_fwd = timed(engine.run, pairs.clean, stop_at_layer=L + 1)
    n = args.threads
    print(f"plain forward over the {B} clean prompts (to layer {L}): {t_fwd:.2f} s {cpu_note('run', n)}")

    runner, t_setup = timed(EdgeRunner, model, ctx, share_prefix=not args.no_share_prefix)
    g = runner.graph
    print(f"graph: {g.n_writers} writers x {g.n_readers} readers, {g.n_edges} edges; runner setup (corrupted writer "
          f"outputs) {t_setup:.2f} s {cpu_note('EdgeRunner', n)}; tokens per patched forward "
          f"{tokens_per_forward(engine, g.n_writers)}")
    if runner.p0:
        print(f"shared prefix: positions 0..{runner.p0 - 1} computed once per pair; each forward runs {T - runner.p0} "
              f"of {T} positions")
    else:
        print(f"full prompts in every forward ({runner.prefix_reason})")

    scores, t_ig = timed(score_edges, model, ctx, "eap-ig", args.steps, runner=runner)
    print(f"EAP-IG ({args.steps} steps) over {g.n_edges} edges: {t_ig:.1f} s = {t_ig / t_fwd:.0f} plain forwards "
          f"(target <= 120 s) {cpu_note('score_edges', n)}")
    print("  top edges: " + ", ".join(f"{n} {v:+.3f}" for n, v in scores.top_edges(8)))

    gen = torch.Generator().manual_seed(args.seed)
    w_idx, r_idx = g.edge_index()
    masks, labels = [], []
    for f in FRACTIONS:
        k = max(1, round(f * g.n_edges))
        masks.append(scores.top_mask(k))
        labels.append(("top", f, k))
        for _ in range(args.n_random):
            pick = torch.randperm(g.n_edges, generator=gen)[:k]
            m = g.empty_mask()
            m[w_idx[pick], r_idx[pick]] = True
            masks.append(m)
            labels.append(("random", f, k))
    masks = torch.stack(masks)
    ev, t_eval = timed(runner.evaluate, masks)
    print(f"evaluate_masks, {len(masks)} circuits ({len(FRACTIONS)} sizes, top + {args.n_random} random each): "
          f"{t_eval:.1f} s = {t_eval / t_fwd:.0f} plain forwards (target <= 180 s) {cpu_note('evaluate', n)}")
    f = ev.faithfulness()
    print(f"  m(N) {ev.full.mean():.4f}  m(empty) {ev.empty.mean():.4f}")
    print("  fraction  edges  f(top)  f(random: mean [min, max])")
    for frac in FRACTIONS:
        top = [f[i].item() for i, lb in enumerate(labels) if lb[:2] == ("top", frac)]
        rnd = torch.tensor([f[i].item() for i, lb in enumerate(labels) if lb[:2] == ("random", frac)])
        k = next(lb[2] for lb in labels if lb[1] == frac)
        print(f"  {frac:7.3f} {k:6d}  {top[0]:6.3f}  {rnd.mean():6.3f} [{rnd.min():.3f}, {rnd.max():.3f}]")


if __name__ == "__main__":
    main()
