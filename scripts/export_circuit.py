"""Export a saved circuit to other formats.

    python scripts/export_circuit.py RUN_DIR --formats json,graphml,gexf,dot,html,png,svg [--out DIR]

Reads ``RUN_DIR/circuit/graph.json`` (the circuit written by ``wordpos run`` / ``wordpos circuit``: the edge
circuit, whose figure is its saved diagram ``circuit.plotly.json``, or a head-level graph; ``--full``:
``graph_full.json``, the unpruned head-level graph) and writes ``graph.<format>`` for each format into ``--out`` (default:
the circuit folder). ``html`` is one standalone page (plotly.js embedded, opens offline); ``png`` / ``svg``
need kaleido with Chromium and are skipped with a warning without them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GRAPH_FORMATS = ("json", "graphml", "gexf", "dot")
FIGURE_FORMATS = ("html", "png", "svg")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a `wordpos run` / `wordpos circuit` directory (or its circuit/ folder)")
    ap.add_argument("--formats", default=",".join(GRAPH_FORMATS + FIGURE_FORMATS),
                    help="comma-separated subset of " + ",".join(GRAPH_FORMATS + FIGURE_FORMATS))
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the circuit folder)")
    ap.add_argument("--full", action="store_true", help="export the unpruned graph (graph_full.json)")
    args = ap.parse_args(argv)
    formats = [f.strip().lower().lstrip(".") for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in GRAPH_FORMATS + FIGURE_FORMATS]
    if unknown or not formats:
        ap.error(f"unknown format(s) {unknown or formats}; choose from {', '.join(GRAPH_FORMATS + FIGURE_FORMATS)}")

    from wordpos.circuit.export import load_graph, save_graph
    from wordpos.circuit.render import render_circuit, save_circuit_figure
    from wordpos.probing.errors import WordposError

    cdir = args.run if (args.run / "graph.json").exists() else args.run / "circuit"
    stem = "graph_full" if args.full else "graph"
    out = args.out or cdir
    try:
        G = load_graph(cdir / f"{stem}.json")
        for fmt in formats:
            if fmt in GRAPH_FORMATS:
                print(save_graph(G, out / f"{stem}.{fmt}"))
        figs = [f for f in formats if f in FIGURE_FORMATS]
        if figs:
            if G.graph.get("graph_kind") == "edges":  # the edge circuit: its diagram (with the top-K slider) as saved
                import plotly.io as pio

                fig = pio.read_json(cdir / "circuit.plotly.json")
            else:
                fig = render_circuit(G)
            written = save_circuit_figure(fig, out, name=stem, png="png" in figs, svg="svg" in figs)
            for p in written[stem]:
                if p.suffix.lstrip(".") in figs:
                    print(p)
    except WordposError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    sys.exit(main())
