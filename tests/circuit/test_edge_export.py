"""Edge-level graphs through circuit/export.py: every format round-trips, the reader (q/k/v/mlp/probe) travels
as an edge attribute, and the MIB-style JSON flags exactly the circuit's edges."""

import json
import math

import networkx as nx
import numpy as np
import pytest
import torch

from wordpos.circuit.export import FORMATS, edge_graph_networkx, load_graph, save_edge_graph, save_mib_json
from wordpos.patching.edge_graph import EdgeGraph, EdgeScores

CIRCUIT = ["input->a0.h1<v>", "a0.h1->a1.h0<v>", "a0.h1->a1.h0<q>", "a1.h0->probe", "input->m0", "m0->probe",
           "m0->a1.h1<k>"]


@pytest.fixture
def scored():
    g = EdgeGraph.build(2, 4, 2, 1)  # grouped-query attention: k/v readers per key/value head
    rng = np.random.default_rng(0)
    return EdgeScores(g, torch.tensor(rng.normal(size=tuple(g.valid.shape))), "eap-ig", "logit_diff", 8), \
        g.mask_from_edges(CIRCUIT)


def _same(G, H):
    assert nx.utils.graphs_equal(G, H)
    for scope_g, scope_h in ((G.nodes(data=True), H.nodes), (G.edges(data=True), H.edges)):
        for *key, d in scope_g:
            other = scope_h[key[0]] if len(key) == 1 else scope_h[key[0], key[1]]
            for k, v in d.items():
                w = other[k]
                assert type(w) is type(v), (key, k, v, w)
                assert w == v or (isinstance(v, float) and math.isnan(v) and math.isnan(w)), (key, k)
    assert G.graph == H.graph


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("circuit_only", [True, False])
def test_edge_graph_round_trips_with_reader_attribute(scored, tmp_path, suffix, circuit_only):
    scores, mask = scored
    G = edge_graph_networkx(scores, mask, circuit_only=circuit_only, model="toy")
    (path,) = save_edge_graph(scores, tmp_path, mask, formats=(suffix,), circuit_only=circuit_only, model="toy")
    H = load_graph(path)
    _same(G, H)
    names = {d["name"]: d for *_, d in H.edges(data=True)}
    if circuit_only:
        assert sorted(names) == sorted(CIRCUIT)
    else:
        assert len(names) == scores.graph.n_edges
        assert sum(d["in_graph"] for d in names.values()) == len(CIRCUIT)
    # the reader kind, independently from the name: what follows '<' or the reader's form
    for name, d in names.items():
        r = name.split("->")[1]
        expected = r[-2] if r.endswith(">") else ("probe" if r == "probe" else "mlp")
        assert d["reader"] == expected
        w_idx, r_idx = scores.graph.edge(name)
        assert d["score"] == pytest.approx(float(scores.scores[w_idx, r_idx]))
    # a GQA key/value reader lists the query heads it feeds
    assert H.nodes["a1.h1<k>"]["heads"] == "a1.h2,a1.h3"  # kv head 1 of 2 feeds query heads 2 and 3
    assert H.graph["graph_kind"] == "edges" and H.graph["n_kv_heads"] == 2


def test_mib_json_flags_the_circuit(scored, tmp_path):
    scores, mask = scored
    path = save_mib_json(scores, tmp_path / "circuit_edges.json", mask)
    d = json.loads(path.read_text())
    assert len(d["edges"]) == scores.graph.n_edges
    assert sorted(k for k, v in d["edges"].items() if v["in_graph"]) == sorted(CIRCUIT)
    assert d["edges"]["a1.h0->probe"]["score"] == pytest.approx(float(scores.scores[scores.graph.edge("a1.h0->probe")]))
    in_nodes = {k for k, v in d["nodes"].items() if v["in_graph"]}
    assert {"input", "a0.h1", "a1.h0", "m0", "probe"} <= in_nodes
