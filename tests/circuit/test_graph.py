import networkx as nx
import pytest

from wordpos.circuit import build_graph, faithfulness, prune_min_edges, prune_threshold, prune_top_k
from wordpos.circuit.graph import graph_from_dict, graph_to_dict, probe_inflow
from wordpos.patching import ablate_heads, path_patch_direct, path_patch_edges
from wordpos.probing import ConfigError
from wordpos.probing.models.planted import PLANTED

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
        assert set(res.graph.successors("embed")) == {"0.2"}  # where the circuit first reads the prompt
        assert res.kept_share == pytest.approx(1.1 / probe_inflow(synthetic)) and res.threshold == pytest.approx(0.3)
    assert synthetic.number_of_edges() == 34  # pruning does not touch its input


def test_min_edges_definition(synthetic):
    total = probe_inflow(synthetic)
    # only 0.2 → probe is needed for half of the effect into the probe; 1.1 is not kept, so neither is 0.2 → 1.1
    half = prune_min_edges(synthetic, 0.5)
    assert set(half.graph.edges) == {("0.2", "probe"), ("embed", "0.2")} and half.kept_share >= 0.5
    for keep in (0.8, 0.9, 0.95, 0.99):
        res = prune_min_edges(synthetic, keep)
        assert res.kept_share >= keep
        into = sorted((abs(d["effect"]) for *_, d in synthetic.in_edges("probe", data=True)), reverse=True)
        n_in = sum(1 for u, v in res.kept_edges if v == "probe")
        assert sum(into[: n_in - 1]) < keep * total  # the fewest edges into the probe
        for u, v in res.kept_edges:  # upstream edges carry at least 1 - keep of what their receiver passes on
            if v != "probe":
                flow = sum(abs(res.graph.edges[v, w]["effect"]) for w in res.graph.successors(v))
                assert abs(res.graph.edges[u, v]["effect"]) >= (1 - keep) * flow
    assert prune_min_edges(synthetic, 1.0).kept_share == pytest.approx(1.0)


def test_graph_validation_and_nan(synthetic):
    import numpy as np

    from wordpos.patching.results import EffectResult

    direct = np.full((2, 4), np.nan)
    direct[0, 2] = 0.8
    G = build_graph(EffectResult(direct, ("layer", "head"), "path", "m"), model="toy", probe_layer=1, metric="m",
                    n_prompts=4, n_heads=4)
    assert G.number_of_nodes() == 1 + 8 + 1 and list(G.predecessors("probe")) == ["0.2"]
    assert G.graph["n_heads"] == 4 and G.graph["wordpos_format"] == "wordpos.circuit/1"
    with pytest.raises(ConfigError, match="direct effects have shape"):
        build_graph(EffectResult(direct, ("layer", "head"), "path", "m"), model="toy", probe_layer=2, metric="m",
                    n_prompts=4, n_heads=4)


def test_pruning_that_leaves_nothing_is_an_error(synthetic):
    with pytest.raises(ConfigError, match="largest \\|effect\\| available is 0.8"):
        prune_threshold(synthetic, 5.0)
    with pytest.raises(ConfigError, match="top-k"):
        prune_top_k(synthetic, 0)
    with pytest.raises(ConfigError, match="keep"):
        prune_min_edges(synthetic, 1.5)
    with pytest.raises(ConfigError, match="threshold"):
        prune_threshold(synthetic, -1)


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
    assert empty.share == pytest.approx((direct.accuracy - direct.baseline_abs_pos_accuracy)
                                        / (direct.clean_accuracy - direct.baseline_abs_pos_accuracy))
    assert empty.accuracy_full == pytest.approx(direct.clean_accuracy) and empty.ablated_heads == 8
    same = faithfulness(tiny_model, tiny_probe, small_data, ["0.1", "1.2"])
    assert same.circuit_heads == ["0.1", "1.2"] and same.ablated_heads == 6
    with pytest.raises(ConfigError):
        faithfulness(tiny_model, tiny_probe, small_data, [(0, 9)])


def test_planted_counter_alone_is_faithful(planted_model, planted_probe, planted_data):
    res = faithfulness(planted_model, planted_probe, planted_data, [PLANTED.counter, *PLANTED.receivers])
    assert res.share > 0.8
    res_wrong = faithfulness(planted_model, planted_probe, planted_data, list(PLANTED.distractors.values()))
    assert res_wrong.share < 0.2
