"""Export a saved circuit to other formats.

    python scripts/export_circuit.py runs/organism --formats json,graphml,gexf,dot,html,png,svg --out exports/
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a `wordpos run` or `wordpos circuit` directory (or its circuit/ folder)")
    ap.add_argument("--formats", default="json,graphml,gexf,dot,html,png,svg")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the circuit folder)")
    ap.add_argument("--full", action="store_true", help="export the unpruned graph instead of the circuit")
    args = ap.parse_args()

    from circuit.export import load_graph, save_graph
    from circuit.render import render_circuit
    from probing.plots import save_figures

    cdir = args.run if (args.run / "graph.json").exists() else args.run / "circuit"
    G = load_graph(cdir / ("graph_full.json" if args.full else "graph.json"))
    out = args.out or cdir
    stem = "graph_full" if args.full else "graph"
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    for fmt in formats:
        if fmt in ("json", "graphml", "gexf", "dot"):
            print(save_graph(G, out / f"{stem}.{fmt}"))
    figs = [f for f in formats if f in ("html", "png", "svg")]
    if figs:
        written = save_figures({stem: render_circuit(G)}, out, png="png" in figs, svg="svg" in figs)
        for p in written[stem]:
            print(p)


if __name__ == "__main__":
    main()
