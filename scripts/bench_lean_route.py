"""Time head ablation with the runner's hook-free route for head edits on and off (``patching.lean_route``),
alternating in one process, on SmolLM2-135M's architecture with random weights (``bench.build_smollm2_arch``).
``--width 36`` makes the model narrow enough that its forwards are bound by the host's work per forward, as a GPU's
are; the default width (576) is the real model's arithmetic. Prints the ablated forwards' seconds and the accuracies
(which must agree), and writes JSON with ``--out``.

    python scripts/bench_lean_route.py --width 36 --threads 1      # the host-bound regime
    python scripts/bench_lean_route.py --threads 2                 # the real width on this CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=None, help="d_model (a multiple of 9; default SmolLM2's 576)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--heads", default="0.6,1.7")
    ap.add_argument("--random", type=int, default=10, help="random control sets")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from bench import build_smollm2_arch, scratch_dir
    from wordpos.patching import lean_route
    from wordpos.patching.ablation import ablate_heads
    from wordpos.probing import WordIndexDataset, WordIndexProbe, as_engine, collect_residuals, load_model

    torch.set_num_threads(args.threads)
    path = build_smollm2_arch(scratch_dir("wordpos-lean-route-") / "m", width=args.width)
    model = load_model(str(path), device="cpu")
    engine = as_engine(model)
    data = WordIndexDataset.default(engine.tokenizer, n_prompts=args.prompts, seed=0)
    acts = collect_residuals(model, data, layers=[args.layer], progress=False)
    probe = WordIndexProbe(layer=args.layer, model=engine.name).fit(acts.train(args.layer), acts.labels["train"])
    rows = []
    for method in ("resample", "mean"):
        for r in range(args.rounds):
            for on in (False, True):
                with lean_route.forced(on):
                    res = ablate_heads(model, probe, data, args.heads, method=method, n_random=args.random,
                                       refit=False, progress=False)
                rows.append({"method": method, "round": r, "route": "lean" if on else "hooks",
                             "forward_s": res.config["timings"]["forward_s"], "accuracy": res.accuracy,
                             "random_accuracies": res.random_accuracies})
                print(f"{method:<9} round {r} {rows[-1]['route']:<5} {rows[-1]['forward_s']:.3f} s  "
                      f"accuracy {res.accuracy:.4f}")
    same = all(a["accuracy"] == b["accuracy"] and a["random_accuracies"] == b["random_accuracies"]
               for a, b in zip(rows[::2], rows[1::2]))
    print("same accuracies with and without the route:", same)
    rec = {"width": args.width or 576, "threads": args.threads, "prompts": args.prompts, "layer": args.layer,
           "heads": args.heads, "n_random": args.random, "rows": rows, "same_accuracies": same,
           "torch": torch.__version__}
    if args.out:
        args.out.write_text(json.dumps(rec, indent=1))
    return rec


if __name__ == "__main__":
    main()
