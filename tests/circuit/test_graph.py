import networkx as nx
import pytest

from circuit import build_graph, faithfulness, prune_min_edges, prune_threshold, prune_top_k
from circuit.graph import graph_from_dict, graph_to_dict, probe_inflow
from patching import ablate_heads, path_patch_direct, path_patch_edges
from probing import ConfigError
from probing.planted import PLANTED

EDGE_AXES = ("sender_layer", "sender_head", "receiver_layer", "receiver_head", "via")


def test_graph_nodes_edges_and_attributes(synthetic):
    G = synthetic
    assert G.number_of_nodes() == 1 + 8 + 2 + 1  # embed, heads, MLPs, probe
    assert G.edges["0.2", "probe"]["effect"] == pytest.approx(0.8)
    e = G.edges["0.2", "1.1"]
    assert e["via"] == "v" and e["effect"] == pytest.approx(0.5) and e["method"] == "path" and e["n_prompts"] == 8
    assert {"effect_q", "effect_k", "effect_v"} <= set(e)
    assert not G.has_edge("1.1", "0.2")  # only earlier → later
    assert "role_counter_score" in G.nodes["0.2"] and isinstance(G.nodes["0.2"]["role"], str)
    assert G.graph["model"] == "toy" and probe_inflow(G) > 1.1
    assert nx.utils.graphs_equal(G, graph_from_dict(graph_to_dict(G)))


def test_pruning_recovers_the_planted_structure(synthetic):
    for res in (prune_threshold(synthetic, 0.1), prune_top_k(synthetic, 3), prune_min_edges(synthetic, 0.8)):
        heads = {n for n, d in res.graph.nodes(data=True) if d["kind"] == "head"}
        ranked = {(u, v) for u, v in res.graph.edges if u != "embed"}
        assert heads == {"0.2", "1.1"}, res.rule
        assert ranked == {("0.2", "probe"), ("1.1", "probe"), ("0.2", "1.1")}, res.rule
        assert set(res.graph.successors("embed")) == heads


def test_pruning_that_leaves_nothing_is_an_error(synthetic):
    with pytest.raises(ConfigError, match="largest \\|effect\\| is 0.8"):
        prune_threshold(synthetic, 5.0)
    with pytest.raises(ConfigError, match="top-k"):
        prune_top_k(synthetic, 0)
    with pytest.raises(ConfigError, match="keep"):
        prune_min_edges(synthetic, 1.5)


def test_planted_model_circuit_is_exactly_the_planted_one(planted_model, planted_ctx):
    direct = path_patch_direct(planted_model, planted_ctx, progress=False)
    edges = path_patch_edges(planted_model, planted_ctx, progress=False)
    G = build_graph(direct, edges, None, None, model="planted", probe_layer=1, metric=direct.metric,
                    n_prompts=direct.n_prompts, n_heads=4)
    res = prune_min_edges(G, keep=0.95)
    heads = sorted(n for n, d in res.graph.nodes(data=True) if d["kind"] == "head")
    assert heads == PLANTED.circuit_heads
    got = {(u, v, res.graph.edges[u, v]["via"]) for u, v in res.graph.edges if u != "embed"}
    assert got == set(PLANTED.edges)


def test_faithfulness_of_everything_and_of_nothing(tiny_model, tiny_probe, small_data):
    all_heads = [(L, h) for L in range(2) for h in range(4)]
    full = faithfulness(tiny_model, tiny_probe, small_data, all_heads)
    assert full.share == pytest.approx(1.0, abs=1e-6) and full.ablated_heads == 0
    empty = faithfulness(tiny_model, tiny_probe, small_data, [])
    direct = ablate_heads(tiny_model, tiny_probe, small_data, all_heads, method="mean", refit=False, progress=False)
    assert empty.accuracy_circuit == pytest.approx(direct.accuracy)


def test_planted_counter_alone_is_faithful(planted_model, planted_probe, planted_data):
    res = faithfulness(planted_model, planted_probe, planted_data, [PLANTED.counter, *PLANTED.receivers])
    # the probe also leans on the distractors' position features, which mean ablation blurs: ~0.84, not 1
    assert res.share > 0.8
    res_wrong = faithfulness(planted_model, planted_probe, planted_data, list(PLANTED.distractors.values()))
    assert res_wrong.share < 0.2
