"""EdgeGraph / EdgeScores against a plain enumeration of the edge rule."""

from __future__ import annotations

import math

import pytest
import torch

from wordpos.patching.edge_graph import EdgeGraph, EdgeScores
from wordpos.probing.engines.base import ModelDims
from wordpos.probing.errors import ConfigError, CorruptFileError


def _layer(name: str) -> int:
    if name == "input":
        return -1
    if name == "probe":
        return 99
    return int(name[1:].split(".")[0].split("<")[0])


def _reference_edges(n_layers, n_heads, n_kv, probe_layer):
    """Every (writer, reader) that the rule allows, by a plain loop over names."""
    writers = ["input"] + [n for L in range(probe_layer + 1) for n in [f"a{L}.h{h}" for h in range(n_heads)] + [f"m{L}"]]
    readers = []
    for L in range(probe_layer + 1):
        readers += [f"a{L}.h{h}<q>" for h in range(n_heads)]
        readers += [f"a{L}.h{h}<k>" for h in range(n_kv)] + [f"a{L}.h{h}<v>" for h in range(n_kv)]
        readers.append(f"m{L}")
    readers.append("probe")
    edges = []
    for w in writers:
        for r in readers:
            wl, rl = _layer(w), _layer(r)
            ok = w == "input" or r == "probe" or wl < rl or (wl == rl and w.startswith("a") and r.startswith("m"))
            if ok:
                edges.append(f"{w}->{r}")
    return writers, readers, edges


@pytest.mark.parametrize("dims", [(2, 4, 4, 1), (4, 6, 2, 2), (3, 3, 1, 0)])
def test_graph_matches_rule(dims):
    n_layers, n_heads, n_kv, probe = dims
    g = EdgeGraph.build(n_layers, n_heads, n_kv, probe)
    writers, readers, edges = _reference_edges(*dims)
    assert g.writers == writers
    assert g.readers == readers
    assert g.edge_names() == edges
    assert g.n_edges == len(edges)
    w, r = g.edge_index()
    assert [f"{g.writers[i]}->{g.readers[j]}" for i, j in zip(w.tolist(), r.tolist())] == edges


def test_for_model_and_kinds():
    dims = ModelDims(n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_head=64, n_ctx=2048, d_vocab=49152)
    g = EdgeGraph.for_model(dims, 19)
    assert g.n_writers == 1 + 20 * 10
    assert g.n_readers == 20 * (9 + 3 + 3 + 1) + 1
    assert g.reader_kind("a3.h1<k>") == "k" and g.reader_kind("m3") == "mlp" and g.reader_kind("probe") == "probe"
    assert g.reader_heads("a3.h1<k>") == ["a3.h3", "a3.h4", "a3.h5"]
    assert g.reader_component("a3.h1<k>") == "a3.kv1"
    assert g.reader_component("a3.h7<q>") == "a3.h7"
    assert g.edge("a0.h2->a1.h1<v>") == (g.writer_index("a0.h2"), g.reader_index("a1.h1<v>"))
    with pytest.raises(ConfigError):
        g.edge("a1.h0->a1.h1<v>")  # same layer head -> head does not exist
    with pytest.raises(ConfigError):
        g.reader_index("a3.h3<k>")  # only 3 kv heads
    with pytest.raises(ConfigError):
        EdgeGraph.for_model(dims, 30)


def test_networkx_one_to_one():
    g = EdgeGraph.build(2, 3, 3, 1)
    scores = torch.randn(g.n_writers, g.n_readers)
    mask = g.mask_from_edges(["a0.h2->a1.h1<v>", "a1.h1->probe"])
    nxg = g.to_networkx(scores, mask)
    names = {d["name"] for _, _, d in nxg.edges(data=True)}
    assert names == set(g.edge_names()) and nxg.number_of_edges() == g.n_edges
    d = nxg.edges["a0.h2", "a1.h1<v>"]
    assert d["reader"] == "v" and d["in_graph"] and d["score"] == pytest.approx(float(scores[g.edge("a0.h2->a1.h1<v>")]))
    assert not nxg.edges["a0.h0", "probe"]["in_graph"]
    assert nxg.nodes["m0<in>"]["component"] == "m0" and nxg.nodes["m0"]["role"] == "writer"
    assert nxg.nodes["a1.h1<v>"]["component"] == "a1.h1"


def test_scores_roundtrip_top_and_mib(tmp_path):
    g = EdgeGraph.build(2, 2, 2, 1)
    torch.manual_seed(0)
    raw = torch.randn(g.n_writers, g.n_readers)
    s = EdgeScores(g, raw, "eap-ig", "probe_logit_diff", 8, {"steps": 5})
    assert torch.isnan(s.scores[~g.valid]).all()
    # top edges by |score| from a plain sort over the valid entries
    names = g.edge_names()
    vals = [float(raw[g.edge(n)]) for n in names]
    ref = sorted(zip(names, vals), key=lambda t: -abs(t[1]))[:5]
    got = s.top_edges(5)
    assert [n for n, _ in got] == [n for n, _ in ref]
    assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(got, ref))
    assert int(s.top_mask(5).sum()) == 5
    s.save(tmp_path / "sc")
    t = EdgeScores.load(tmp_path / "sc")
    assert t.method == "eap-ig" and t.n_pairs == 8 and t.config == {"steps": 5}
    assert torch.equal(torch.nan_to_num(t.scores, 7.0), torch.nan_to_num(s.scores, 7.0))
    mib = s.to_mib_json(s.top_mask(1))
    assert len(mib["edges"]) == g.n_edges
    assert sum(e["in_graph"] for e in mib["edges"].values()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "edge_scores.json").write_text("{")
    with pytest.raises(CorruptFileError):
        EdgeScores.load(tmp_path / "bad")
    with pytest.raises(ConfigError):
        EdgeScores(g, raw, "magic", "m", 1)


def test_networkx_in_graph_only_and_mib_nodes_match_the_whole_graph():
    """``to_networkx(in_graph_only=True)`` equals the whole graph with the other edges and the nodes left bare
    removed (networkx's own operations: same nodes in the same order, same attributes); MIB's node flags are the
    nodes an in-graph edge touches, read off the whole networkx graph (a reader's heads for q/k/v readers)."""
    g = EdgeGraph.build(3, 4, 4, 2)
    torch.manual_seed(1)
    scores = torch.randn(g.n_writers, g.n_readers)
    mask = g.mask_from_edges(["a0.h2->a1.h1<v>", "a1.h1->probe", "m0->a2.h3<k>", "input->m1"])
    ref = g.to_networkx(scores, mask)
    ref.remove_edges_from([(u, v) for u, v, d in ref.edges(data=True) if not d["in_graph"]])
    ref.remove_nodes_from([n for n in list(ref) if ref.degree(n) == 0])
    got = g.to_networkx(scores, mask, in_graph_only=True)
    assert list(got.nodes(data=True)) == list(ref.nodes(data=True))
    assert list(got.edges(data=True)) == list(ref.edges(data=True)) and got.number_of_edges() == 4
    s = EdgeScores(g, scores, "eap", "m", 2)
    mib = s.to_mib_json(mask)
    touched = set()
    for u, v, d in ref.edges(data=True):
        touched.add(u)
        r = ref.nodes[v]
        touched.update(r["heads"] or [r["component"]])
    assert {n for n, d in mib["nodes"].items() if d["in_graph"]} == touched
    assert {n for n, d in mib["edges"].items() if d["in_graph"]} == {d["name"] for *_, d in ref.edges(data=True)}
    assert mib["edges"]["m0->a2.h3<k>"]["score"] == pytest.approx(float(scores[g.edge("m0->a2.h3<k>")]))
