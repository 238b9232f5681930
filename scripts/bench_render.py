"""Time the edge-circuit stage's figures and exports (its ``render`` phase) for a circuit of a given size, without a
model: the calls ``circuit.edge_circuit.edge_circuit_stage`` makes after its curves (the circuit's record, the MIB
JSON, the graph in node-link JSON, GraphML, GEXF and DOT, the diagram and its HTML/JSON; PNGs are queued, as in
``wordpos run``), on a random-score circuit of SmolLM2-135M's graph shape. Host work only: it costs the same next to
a GPU. Prints seconds per part (first call, then the best of the warm ones) and writes JSON with ``--out``.

    python scripts/bench_render.py --edges 6216 --probe-layer 19      # real SmolLM2-135M's circuit size
    python scripts/bench_render.py --edges 429 --probe-layer 8        # the H100 benchmark's random-weight circuit
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edges", type=int, default=6216, help="edges in the circuit (top |score|)")
    ap.add_argument("--probe-layer", type=int, default=19)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="warm calls after the first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import gc

    import torch

    from wordpos.circuit.edge_circuit import EdgeCircuit, load_stage_modules, node_view
    from wordpos.circuit.edge_render import render_circuit_edges, save_edge_circuit_figure
    from wordpos.circuit.export import save_edge_graph, save_mib_json
    from wordpos.patching.edge_graph import EdgeGraph, EdgeScores
    from wordpos.probing.plots import deferred_images

    load_stage_modules()
    g = EdgeGraph.build(args.layers, args.heads, args.kv_heads, args.probe_layer)
    torch.manual_seed(args.seed)
    sc = EdgeScores(g, torch.randn(g.valid.shape), "eap-ig", "random", 16)
    top = sc.top_edges(args.edges)
    mask = g.mask_from_edges([e for e, _ in top])
    circuit = EdgeCircuit(graph=g.to_dict(), rule="top-n", target=0.8, ablation="counterfactual", method="eap-ig",
                          prune=True, n_top=len(top), edges=[e for e, _ in top], edge_scores=[s for _, s in top],
                          n_valid=int(g.valid.sum()), faithfulness=0.9, ci=[0.8, 1.0], reached=True,
                          nodes=node_view(g, mask), m_full=1.0, m_empty=0.0, n_pairs=16, rounds=3)
    out = Path(tempfile.mkdtemp(prefix="wordpos-render-"))
    parts = {
        "record": lambda: circuit.save(out),
        "mib json": lambda: save_mib_json(sc, out / "circuit_edges.json", mask),
        "graph exports": lambda: save_edge_graph(sc, out, mask, circuit_only=True, model="m",
                                                 ablation="counterfactual", target=0.8, faithfulness=0.9),
        "diagram": lambda: save_edge_circuit_figure(render_circuit_edges(circuit, title="circuit", as_dict=True), out,
                                                    png=True),
    }
    runs = []
    try:
        with deferred_images(enabled=False):
            for _ in range(1 + args.repeats):
                gc.collect()  # (a collection inside a part would time the heap, not the part)
                times = {}
                for name, fn in parts.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name] = time.perf_counter() - t0
                times["all"] = sum(times.values())
                runs.append(times)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    best = {k: min(r[k] for r in runs[1:]) if args.repeats else runs[0][k] for k in runs[0]}
    rec = {"edges": args.edges, "graph": {"layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                                          "probe_layer": args.probe_layer, "valid_edges": int(g.valid.sum())},
           "first_s": runs[0], "warm_best_s": best, "python": platform.python_version(),
           "host": platform.processor() or platform.machine()}
    print(f"{args.edges} edges of a {int(g.valid.sum())}-edge graph (probe at layer {args.probe_layer})")
    for k in runs[0]:
        print(f"  {k:<14} first {runs[0][k]:.4f} s   warm best {best[k]:.4f} s")
    if args.out:
        args.out.write_text(json.dumps(rec, indent=1))
    return rec


if __name__ == "__main__":
    sys.exit(main() and 0)
