"""Circuit: the edge circuit (faithfulness curves against random circuits, CPR/CMD, the smallest circuit reaching a
target, its diagram and MIB-style exports), the former head-level graph (pruning, faithfulness, plotly diagram),
exports (JSON, GraphML, GEXF, DOT), the HTML report and the ``wordpos`` command line."""

from wordpos.circuit.edge_circuit import EdgeCircuit, edge_circuit_stage, select_circuit
from wordpos.circuit.edge_render import render_circuit_edges, render_edge_circuit
from wordpos.circuit.evaluation import Curve, faithfulness_curve, node_curve
from wordpos.circuit.export import edge_graph_networkx, load_graph, save_edge_graph, save_graph, save_mib_json
from wordpos.circuit.faithfulness import FaithfulnessResult, faithfulness
from wordpos.circuit.graph import build_graph, circuit_heads, graph_from_dict, graph_to_dict, probe_inflow
from wordpos.circuit.prune import PruneResult, prune_min_edges, prune_threshold, prune_top_k
from wordpos.circuit.render import render_circuit, save_circuit_figure

__all__ = ["Curve", "EdgeCircuit", "FaithfulnessResult", "PruneResult", "build_graph", "circuit_heads",
           "edge_circuit_stage", "edge_graph_networkx", "faithfulness", "faithfulness_curve", "graph_from_dict",
           "graph_to_dict", "load_graph", "node_curve", "probe_inflow", "prune_min_edges", "prune_threshold",
           "prune_top_k", "render_circuit", "render_circuit_edges", "render_edge_circuit", "save_circuit_figure",
           "save_edge_graph", "save_graph", "save_mib_json", "select_circuit"]
