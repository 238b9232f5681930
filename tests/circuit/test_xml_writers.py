"""The one-pass GraphML and GEXF writers against networkx's own writers: the same bytes, or no bytes at all."""

import io
import math
from xml.etree.ElementTree import SubElement

import networkx as nx
import numpy as np
import pytest
import torch

from wordpos.circuit.export import edge_graph_networkx
from wordpos.circuit.xml_writers import write_gexf, write_graphml
from wordpos.patching.edge_graph import EdgeGraph, EdgeScores


def _nx_graphml(G):
    buf = io.BytesIO()
    nx.write_graphml_xml(G, buf, prettyprint=False)
    return buf.getvalue()


def _nx_gexf(G, description=None):
    w = nx.readwrite.gexf.GEXFWriter(encoding="utf-8", prettyprint=False)
    w.add_graph(G)
    if description is not None:
        SubElement(w.xml.find("meta"), "description").text = description
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def _ours(write, G, *args):
    buf = io.BytesIO()
    assert write(G, buf, *args) is True
    return buf.getvalue()


def _tricky():
    """Names and values that need escaping, every scalar type, an attribute whose type differs between nodes,
    empty strings, non-finite floats, nodes and edges without data, integer node names."""
    G = nx.DiGraph(model='a & b <c> "d"', note="line\nbreak\ttab", n=3, ratio=0.25, ok=True, empty="")
    G.add_node("a3.h1<q>", kind="reader", layer=3, label="3.1 <q>")
    G.add_node("m2", kind="mlp", layer="2", score=float("nan"))
    G.add_node("é→ü", kind="head", big=float("inf"), small=float("-inf"), flag=False, blank="")
    G.add_node(7)
    G.add_node("lonely")
    G.add_edge("m2", "a3.h1<q>", name="m2->a3.h1<q>", reader="q", score=-0.5, in_graph=True)
    G.add_edge("é→ü", "m2", name='x"y', score=1e-300, in_graph=False, note="&amp; literal")
    G.add_edge(7, "lonely")
    return G


def _surrogates():
    """Lone surrogates (a tokenizer's broken byte pair, say): ElementTree writes them as character references, which
    no XML parser reads back, so only the bytes are compared."""
    G = _tricky()
    G.add_node("sur\ud800", tok="lone \udfff surrogate")
    G.graph["odd"] = "\ud83d"
    return G


def _edge_graph(n_edges):
    g = EdgeGraph.build(6, 9, 3, 5)
    torch.manual_seed(0)
    sc = EdgeScores(g, torch.randn(g.valid.shape), "eap-ig", "m", 16)
    mask = g.mask_from_edges([e for e, _ in sc.top_edges(n_edges)])
    return edge_graph_networkx(sc, mask, circuit_only=True, model="m", ablation="counterfactual", target=0.8,
                               faithfulness=0.9)


@pytest.fixture(params=["tricky", "surrogates", "edges-40", "edges-600", "synthetic", "empty", "no-graph-attrs"])
def graph(request, synthetic):
    return {"tricky": _tricky, "surrogates": _surrogates, "edges-40": lambda: _edge_graph(40), "edges-600": lambda: _edge_graph(600),
            "synthetic": lambda: synthetic, "empty": nx.DiGraph,
            "no-graph-attrs": lambda: nx.DiGraph([("a", "b", {"w": 1})])}[request.param]()


def test_graphml_bytes_are_networkxs(graph):
    assert _ours(write_graphml, graph) == _nx_graphml(graph)


def test_gexf_bytes_are_networkxs(graph):
    assert _ours(write_gexf, graph) == _nx_gexf(graph)
    assert _ours(write_gexf, graph, 'attrs: {"a": "<&>"}') == _nx_gexf(graph, 'attrs: {"a": "<&>"}')


def test_what_networkx_reads_back_is_the_graph():
    """An independent check of the same files: networkx's readers give the nodes, edges and values back."""
    G = _tricky()
    H = nx.read_graphml(io.BytesIO(_ours(write_graphml, G)))
    assert sorted(H.nodes) == sorted(str(n) for n in G.nodes) and H.number_of_edges() == 3
    assert H.nodes["a3.h1<q>"]["layer"] == 3 and H.nodes["m2"]["layer"] == "2" and math.isnan(H.nodes["m2"]["score"])
    assert H.graph["model"] == 'a & b <c> "d"' and H.graph["note"] == "line\nbreak\ttab"
    X = nx.read_gexf(io.BytesIO(_ours(write_gexf, G)))
    assert X.edges["m2", "a3.h1<q>"]["score"] == -0.5 and X.nodes["é→ü"]["big"] == np.inf
    assert X.edges["é→ü", "m2"]["name"] == 'x"y' and X.edges["é→ü", "m2"]["note"] == "&amp; literal"


@pytest.mark.parametrize("case", ["multigraph", "undirected", "list value", "graph id", "node default",
                                  "gexf node viz", "gexf node id", "gexf node key", "gexf edge weight",
                                  "gexf edge label", "gexf edge key", "gexf graph name", "object node"])
def test_out_of_scope_graphs_write_nothing(case):
    """What networkx's writers treat specially (or refuse) is left to them: ``False`` and not a byte written."""
    G = nx.DiGraph([("a", "b")])
    formats = (write_graphml, write_gexf)
    if case == "multigraph":
        G = nx.MultiDiGraph([("a", "b")])
    elif case == "undirected":
        G = nx.Graph([("a", "b")])
    elif case == "list value":
        G.nodes["a"]["xs"] = [1, 2]
    elif case == "graph id":
        G.graph["id"], formats = "g", (write_graphml,)
    elif case == "node default":
        G.graph["node_default"] = {"kind": "x"}
    elif case == "object node":
        G.add_node(("tuple", 1))
    else:
        formats = (write_gexf,)
        key, value = {"gexf node viz": ("viz", 1), "gexf node id": ("id", "n"), "gexf graph name": ("name", "g"),
                      "gexf node key": ("key", 1), "gexf edge key": ("key", 1),  # (networkx renames it)
                      "gexf edge weight": ("weight", 2.0), "gexf edge label": ("label", "l")}[case]
        if case == "gexf graph name":
            G.graph[key] = value
        elif "node" in case:
            G.nodes["a"][key] = value
        else:
            G.edges["a", "b"][key] = value
    for write in formats:
        buf = io.BytesIO()
        assert write(G, buf) is False and buf.getvalue() == b""


@pytest.mark.parametrize("suffix", [".graphml", ".gexf", ".dot", ".json"])
def test_escaped_names_and_values_round_trip_through_save_graph(tmp_path, suffix):
    """The writers as ``save_graph`` uses them, on names and values that need escaping in every format."""
    from wordpos.circuit import load_graph, save_graph
    from wordpos.circuit.graph import FORMAT

    G = _tricky()
    G.remove_node(7)
    G.nodes["m2"]["layer"] = 2  # (an attribute typed differently on two nodes reads back as one type: the formats')
    G.add_edge("lonely", 'back\\slash "q"', note="tab\tlf\n")  # (XML parsers turn a \r in text into \n)
    G.graph["wordpos_format"] = FORMAT
    H = load_graph(save_graph(G, tmp_path / f"g{suffix}"))
    assert sorted(H.nodes) == sorted(G.nodes) and sorted(H.edges) == sorted(G.edges)
    for n, d in G.nodes(data=True):
        for k, v in d.items():
            got = H.nodes[n][k]
            assert (math.isnan(got) and math.isnan(v)) if isinstance(v, float) and math.isnan(v) else got == v, (n, k)
    for u, v, d in G.edges(data=True):
        assert H.edges[u, v] == d
    assert H.graph["model"] == G.graph["model"] and H.graph["note"] == G.graph["note"]
