"""Circuit: a networkx graph of head → probe effects, pruning and faithfulness, an interactive plotly diagram,
exports (JSON, GraphML, GEXF, DOT), the HTML report and the ``wordpos`` command line."""

from circuit.export import load_graph, save_graph
from circuit.faithfulness import FaithfulnessResult, faithfulness
from circuit.graph import build_graph, circuit_heads, graph_from_dict, graph_to_dict, probe_inflow
from circuit.prune import PruneResult, prune_min_edges, prune_threshold, prune_top_k
from circuit.render import render_circuit, save_circuit_figure

__all__ = ["FaithfulnessResult", "PruneResult", "build_graph", "circuit_heads", "faithfulness", "graph_from_dict",
           "graph_to_dict", "load_graph", "probe_inflow", "prune_min_edges", "prune_threshold", "prune_top_k",
           "render_circuit", "save_circuit_figure", "save_graph"]
