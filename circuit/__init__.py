"""Circuit: the edge circuit (faithfulness curves against random circuits, CPR/CMD, the smallest circuit reaching a
target, its diagram and MIB-style exports), the former head-level graph (pruning, faithfulness, plotly diagram),
exports (JSON, GraphML, GEXF, DOT), the HTML report and the ``wordpos`` command line."""

from wordpos.probing.lazy import lazy_exports

# public names, imported from their submodules on first use (see probing.lazy)
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "edge_circuit": ["EdgeCircuit", "edge_circuit_stage", "select_circuit"],
    "edge_render": ["render_circuit_edges", "render_edge_circuit"],
    "evaluation": ["Curve", "faithfulness_curve", "node_curve"],
    "export": ["edge_graph_networkx", "load_graph", "save_edge_graph", "save_graph", "save_mib_json"],
    "faithfulness": ["FaithfulnessResult", "faithfulness"],
    "pipeline": ["RunConfig", "run_pipeline"],
    "graph": ["build_graph", "circuit_heads", "graph_from_dict", "graph_to_dict", "probe_inflow"],
    "prune": ["PruneResult", "prune_min_edges", "prune_threshold", "prune_top_k"],
    "render": ["render_circuit", "save_circuit_figure"],
})
