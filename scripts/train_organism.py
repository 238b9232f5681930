"""Train the organism (fixed seed, CPU) and write it to probing/models/assets/organism (or --out), with the
shared manifest (wordpos_model.json, see wordpos.probing.models.manifest).

    python scripts/train_organism.py                 # reproduces (restores) the shipped model
    python scripts/train_organism.py --steps 300 --out /tmp/organism-quick

In an installed wordpos, `wordpos models pull organism --force` retrains into the cache instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from wordpos.probing.io import atomic_dir
    from wordpos.probing.models.manifest import MANIFEST
    from wordpos.probing.models.organism import ASSET_DIR, OrganismConfig, train_organism, verify

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = OrganismConfig()
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--layers", type=int, default=d.n_layer)
    ap.add_argument("--d-model", type=int, default=d.n_embd)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = OrganismConfig(steps=args.steps, n_layer=args.layers, n_embd=args.d_model, lr=args.lr, seed=args.seed)
    t0 = time.perf_counter()
    with atomic_dir(args.out) as tmp:
        train_organism(tmp, cfg)
        verify(tmp)
    meta = json.loads((args.out / MANIFEST).read_text())
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**20:.1f} MB) in {time.perf_counter() - t0:.0f} s: "
          f"train loss {meta['train_loss_last50']:.3f}, val loss {meta['val_loss']:.3f}")


if __name__ == "__main__":
    main()
